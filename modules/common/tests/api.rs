//! The common module through the test kit: it reports exactly the modules this build
//! links, and answers the same in process and over HTTP.

use poem::http::Method;
use serde_json::Value;
use trellis_common as _;
use trellis_testkit::TestApp;

#[tokio::test]
async fn the_module_list_is_the_registry_in_process_and_over_http() {
    let app = TestApp::builder().spawn().await;
    let registered: Vec<&str> = trellis_core::registered_modules()
        .expect("the registry resolves")
        .iter()
        .map(|m| m.name())
        .collect();
    assert!(registered.contains(&"common"));

    let in_process: Value = app
        .call(Method::GET, "/api/v1/modules")
        .send()
        .await
        .expect_json(200);
    let over_http: Value = app
        .call(Method::GET, "/api/v1/modules")
        .send_http()
        .await
        .expect_json(200);
    assert_eq!(in_process, over_http);
    let listed: Vec<&str> = in_process["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(listed, registered, "{in_process}");
}

#[tokio::test]
async fn an_unknown_path_is_a_problem_not_a_bare_404() {
    let app = TestApp::builder().spawn().await;
    let problem = app
        .call(Method::GET, "/api/v1/nothing-here?x=1")
        .send()
        .await
        .problem(404);
    assert_eq!(problem.kind, "not-found", "{:?}", problem.body);
}
