//! `/openapi.json`: generated from the handlers' `utoipa::path` annotations and the request
//! and response types' `ToSchema` derives, so it cannot drift from the code.

use axum::Json;
use utoipa::OpenApi;

use crate::{control, ext};

#[derive(OpenApi)]
#[openapi(
    info(title = "smolvm serve", description = "E2B's sandbox API over local smolvm sandboxes, and smolvm's own routes under /smolvm/v1/. Authenticate with X-API-Key (or Authorization: Bearer). The in-sandbox API (envd: /process.Process/*, /filesystem.Filesystem/*, /files) is E2B's Connect protocol, reached with the E2b-Sandbox-Id header and the sandbox's envdAccessToken."),
    paths(
        control::create, control::list, control::list_v1, control::get_one, control::kill, control::set_timeout, control::pause, control::connect, control::resume, control::metrics,
        ext::templates, ext::get_network, ext::put_network, ext::snapshot, ext::snapshots, ext::delete_snapshot,
    ),
    components(schemas(control::ApiError, control::NewSandbox, control::Sandbox, control::ListedSandbox, control::TimeoutBody, ext::Template, ext::NewSnapshot, ext::Snapshot)),
    tags((name = "sandboxes", description = "E2B-compatible"), (name = "smolvm", description = "smolvm extensions")),
)]
#[derive(Debug)]
pub struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_the_extensions() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        let paths = doc["paths"].as_object().map(|p| p.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        for p in [
            "/v2/sandboxes",
            "/sandboxes/{sandboxID}",
            "/sandboxes/{sandboxID}/timeout",
            "/v2/sandboxes/{sandboxID}/connect",
            "/smolvm/v1/templates",
            "/smolvm/v1/snapshots",
        ] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        assert!(doc["components"]["schemas"]["NewSandbox"]["properties"]["templateID"].is_object());
    }
}
