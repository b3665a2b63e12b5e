//! The committed `openapi.yaml` must be what the code generates. Refresh it with
//! `WRENN_BLESS=1 cargo test -p wrenn-server --test openapi`.

#[test]
fn committed_document_matches_the_code() {
    let generated = wrenn_server::openapi::yaml();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    if std::env::var_os("WRENN_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the document the code generates; refresh it with \
         `WRENN_BLESS=1 cargo test -p wrenn-server --test openapi` and commit it",
        path.display()
    );
}

#[test]
fn document_is_openapi_3_1_with_every_route() {
    let doc: serde_json::Value = serde_json::to_value(wrenn_server::openapi::document()).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/exec",
        "/v1/sandboxes/{id}/exec/stream",
        "/v1/sandboxes/{id}/pause",
        "/v1/sandboxes/{id}/resume",
        "/v1/sandboxes/{id}/timeout",
        "/v1/sandboxes/{id}/files",
        "/v1/sandboxes/{id}/files/read",
        "/v1/snapshots",
        "/v1/snapshots/{name}",
        "/v1/hosts",
        "/v1/hosts/heartbeat",
        "/v1/hosts/{id}",
        "/v1/api-keys",
        "/v1/api-keys/{id}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
}
