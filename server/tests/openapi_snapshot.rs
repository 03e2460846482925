//! The committed document (`openapi/openapi.json`) is the document of the default build.
//! When the API changes on purpose, refresh it with
//! `UPDATE_OPENAPI_SNAPSHOT=1 cargo test -p trellis-server --test openapi_snapshot`
//! and review the diff like code.

use std::path::Path;

#[test]
fn committed_document_matches_the_code() {
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let current = format!("{}\n", trellis_server::openapi_json());
    if std::env::var_os("UPDATE_OPENAPI_SNAPSHOT").is_some() {
        std::fs::write(&snapshot, &current).expect("snapshot written");
        return;
    }
    let committed = std::fs::read_to_string(&snapshot).unwrap_or_default();
    assert!(
        committed == current,
        "openapi/openapi.json differs from the document the code produces.\n\
         If the change is intended, run:\n  \
         UPDATE_OPENAPI_SNAPSHOT=1 cargo test -p trellis-server --test openapi_snapshot\n\
         and commit the result.\n--- code ---\n{current}"
    );
}

#[test]
fn printed_document_is_valid_openapi_3_json() {
    let doc: serde_json::Value =
        serde_json::from_str(&trellis_server::openapi_json()).expect("the document is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
}
