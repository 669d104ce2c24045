//! The operator's API: retention passes and per-namespace usage. It is served only on a Unix
//! socket inside the private state dir (`admin.sock`, 0600), so reaching the socket is the
//! whole of its authentication: no token opens it, and the TCP listener has none of it.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use boxwood_core::Service;

use crate::error::ApiResult;
use crate::extract::QueryPairs;

/// Where the admin socket lives under the state dir.
pub const ADMIN_SOCKET: &str = "admin.sock";

pub fn admin_router(service: Service) -> Router {
    Router::new()
        .route("/gc", post(gc))
        .route("/usage", get(usage))
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(service)
}

/// `POST /gc[?dry_run=true]`: one retention pass now.
async fn gc(State(svc): State<Service>, q: QueryPairs) -> ApiResult<Response> {
    let dry_run = q.flag("dry_run")?;
    Ok(Json(svc.collect(dry_run).await?).into_response())
}

/// `GET /usage`: what each namespace keeps.
async fn usage(State(svc): State<Service>) -> ApiResult<Response> {
    Ok(Json(svc.usage().await?).into_response())
}
