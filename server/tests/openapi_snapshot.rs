//! The committed documents are the documents of the builds: `openapi/openapi.json` for the
//! default build, `openapi/snapshots/<modules>.json` for a build with other modules
//! (`common+user`, `none`). When the API changes on purpose, refresh the document of the
//! build under test with
//! `UPDATE_OPENAPI_SNAPSHOT=1 cargo test -p trellis-server --test openapi_snapshot`
//! (plus that build's `--no-default-features --features ...`) and review the diff like
//! code.

use std::{collections::BTreeSet, path::PathBuf};

/// The modules of the default build: the server's default features that link a module.
fn default_modules() -> BTreeSet<String> {
    let manifest: toml::Table = include_str!("../Cargo.toml")
        .parse()
        .expect("server/Cargo.toml is TOML");
    let features = manifest["features"].as_table().expect("[features]");
    let strings = |value: &toml::Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    strings(&features["default"])
        .into_iter()
        .filter(|feature| {
            features
                .get(feature)
                .map(strings)
                .unwrap_or_default()
                .iter()
                .any(|enables| enables.starts_with("dep:trellis-"))
        })
        .collect()
}

/// Where this build's document is committed.
fn snapshot() -> PathBuf {
    let modules: BTreeSet<String> = trellis_core::registered_modules()
        .expect("the registry resolves")
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi");
    if modules == default_modules() {
        return dir.join("openapi.json");
    }
    let name = match modules.is_empty() {
        true => "none".to_owned(),
        false => modules.into_iter().collect::<Vec<_>>().join("+"),
    };
    dir.join("snapshots").join(format!("{name}.json"))
}

#[test]
fn committed_document_matches_the_code() {
    let snapshot = snapshot();
    let current = format!("{}\n", trellis_server::openapi_json());
    if std::env::var_os("UPDATE_OPENAPI_SNAPSHOT").is_some() {
        std::fs::create_dir_all(snapshot.parent().expect("a folder")).expect("folder");
        std::fs::write(&snapshot, &current).expect("snapshot written");
        return;
    }
    let committed = std::fs::read_to_string(&snapshot).unwrap_or_default();
    assert!(
        committed == current,
        "{} differs from the document this build's code produces (or is missing).\n\
         If the change is intended, run the same test with UPDATE_OPENAPI_SNAPSHOT=1:\n  \
         UPDATE_OPENAPI_SNAPSHOT=1 cargo test -p trellis-server --test openapi_snapshot \
         [--no-default-features --features ...]\n\
         and commit the result.\n--- code ---\n{current}",
        snapshot.display()
    );
}

#[test]
fn the_default_modules_are_the_default_features_that_link_a_module() {
    let modules = default_modules();
    assert!(modules.contains("common"), "{modules:?}");
    for backend in ["sqlite", "postgres", "redis", "sqs"] {
        assert!(!modules.contains(backend), "{backend} is not a module");
    }
}

#[test]
fn printed_document_is_valid_openapi_3_json() {
    let doc: serde_json::Value =
        serde_json::from_str(&trellis_server::openapi_json()).expect("the document is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    if !trellis_core::registered_modules()
        .expect("the registry resolves")
        .is_empty()
    {
        assert!(doc["paths"].as_object().is_some_and(|p| !p.is_empty()));
    }
}
