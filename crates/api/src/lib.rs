//! Boxwood's HTTP API: the Contree v1 routes (`/v1/...`) over [`boxwood_core::Service`].
//! Handlers parse and delegate; errors become the contract's envelope in [`error`].

mod admin;
mod error;
mod extract;
mod handlers;
mod inspect;
mod metrics;
mod processes;
mod serve;
mod sse;

use std::any::Any;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::routing::{patch, post};
use boxwood_core::Service;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::NotForContentType;
use tower_http::trace::TraceLayer;

pub use admin::{ADMIN_SOCKET, admin_router};
pub use error::{ApiError, ApiResult};
pub use extract::bearer_token;
pub use metrics::install_metrics;
pub use serve::{HttpConfig, serve};

/// Spawn requests carry stdin inline; allow generous bodies.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

/// The complete HTTP application.
pub fn router(service: Service) -> Router {
    use handlers::*;
    let v1 = Router::new()
        .route("/whoami", get(whoami))
        .route("/images", get(list_images))
        .route("/images/import", post(import_image))
        .route("/images/{id}/tag", patch(set_image_tag).delete(delete_image_tag))
        .route("/images/{id}/lineage", get(image_lineage))
        .route("/files", get(list_files).post(upload_file))
        .route("/files/{sha256}", get(get_file))
        .route("/directory-states", post(create_directory_state))
        .route("/directory-states/{id}", get(get_directory_state))
        .route("/instances", post(spawn_instance))
        .route("/operations", get(list_operations))
        .route("/operations/{id}", get(get_operation).delete(cancel_operation))
        .route("/operations/{id}/events", get(sse::operation_events))
        .route("/operations/{id}/subprocesses", post(processes::create))
        .route("/operations/{id}/subprocesses/{spid}", get(processes::get).delete(processes::signal))
        .route("/operations/{id}/subprocesses/{spid}/stdin", post(processes::stdin))
        .route("/inspect", get(inspect_root_redirect))
        .route("/inspect/", get(find_image_by_tag))
        .route("/inspect/{id}", get(inspect_image_redirect))
        .route("/inspect/{id}/", get(inspect_image))
        .route("/inspect/{id}/list", get(inspect::list))
        .route("/inspect/{id}/download", get(inspect::download).head(inspect::head_download))
        .route("/inspect/{id}/archive", get(inspect::archive).head(inspect::head_archive))
        .route("/inspect/{id}/grep", get(inspect::grep));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        // Every response is gzipped when the client accepts it; SSE is compressed by its
        // handler instead, flushed frame by frame (a buffering compressor would stall it).
        .layer(CompressionLayer::new().gzip(true).compress_when(NotForContentType::const_new("text/event-stream")))
        .layer(CatchPanicLayer::custom(on_panic))
        .layer(TraceLayer::new_for_http())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}

fn on_panic(_: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response()
}
