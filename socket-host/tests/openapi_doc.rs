//! The committed `docs/openapi.json` is the description the host generates (issue 21). After a change to a
//! route or a wire type: `cargo run -p socket-host -- openapi > docs/openapi.json`, or run this test with
//! `WAKEEPER_UPDATE_OPENAPI=1`. `scripts/check-openapi` validates the file and runs Schemathesis on a live host.

use socket_host::api::openapi_document;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

#[test]
fn docs_openapi_json_is_the_generated_description() {
    let generated = openapi_document();
    if std::env::var_os("WAKEEPER_UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is not what the host generates: run `cargo run -p socket-host -- openapi > docs/openapi.json`"
    );
}

#[test]
fn the_description_is_openapi_3_1_and_names_every_route_with_its_errors() {
    let doc: serde_json::Value = serde_json::from_str(&openapi_document()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut routes: Vec<String> = paths
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| format!("{} {path}", m.to_uppercase())))
        .collect();
    routes.sort();
    let want = [
        "DELETE /v1/sessions/{tenant_id}",
        "GET /dashboard",
        "GET /health",
        "GET /metrics",
        "GET /openapi.json",
        "GET /ready",
        "GET /v1/sessions",
        "GET /v1/sessions/{tenant_id}",
        "GET /v1/sessions/{tenant_id}/link",
        "GET /v1/webhooks/dead-letters",
        "POST /v1/restore",
        "POST /v1/sessions/{tenant_id}/link",
        "POST /v1/sessions/{tenant_id}/messages",
        "POST /v1/sessions/{tenant_id}/reconnect",
        "POST /v1/sweep",
        "POST /v1/webhooks/dead-letters/{number}/replay",
        "PUT /v1/sessions/{tenant_id}",
    ];
    assert_eq!(routes, want);
    let public = ["GET /health", "GET /ready", "GET /dashboard", "GET /openapi.json"];
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let route = format!("{} {path}", method.to_uppercase());
            let protected = op.get("security").is_some();
            assert_eq!(protected, !public.contains(&route.as_str()), "{route}: security");
            if protected {
                assert!(op["responses"].get("401").is_some(), "{route} documents 401");
            }
            if path.contains("{tenant_id}") {
                assert!(op["responses"].get("400").is_some(), "{route} documents 400 bad_tenant_id");
                let param = &op["parameters"][0];
                assert_eq!(param["name"], "tenant_id");
            }
        }
    }
    let tenant = &doc["components"]["schemas"]["TenantId"];
    assert_eq!(tenant["pattern"], "^[A-Za-z0-9_-]{1,64}$");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}
