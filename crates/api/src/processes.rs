//! Routes of a running instance's processes: `/operations/{id}/subprocesses…`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use boxwood_core::Service;
use boxwood_core::model::{ExecRequest, ProcessCreated, StdinRequest};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, QueryPairs, parse_uuid};
use crate::handlers::location;

fn parse_spid(s: &str) -> ApiResult<i64> {
    s.parse::<i64>().map_err(|_| ApiError::bad_request(format!("spid must be an integer, got {s:?}")))
}

/// `POST /operations/{id}/subprocesses` → 201 `{"spid": N}` + `Location`.
pub async fn create(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> ApiResult<Response> {
    let uuid = parse_uuid("operation", &id)?;
    let spid = svc.create_subprocess(&caller, uuid, req).await?;
    let loc = location(&format!("/v1/operations/{uuid}/subprocesses/{spid}"));
    Ok((StatusCode::CREATED, [(header::LOCATION, loc)], Json(ProcessCreated { spid: spid.into() })).into_response())
}

/// `GET /operations/{id}/subprocesses/{spid}` → `InstanceResult`.
pub async fn get(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path((id, spid)): Path<(String, String)>,
) -> ApiResult<Response> {
    let uuid = parse_uuid("operation", &id)?;
    Ok(Json(svc.get_subprocess(&caller, uuid, parse_spid(&spid)?).await?).into_response())
}

/// `DELETE /operations/{id}/subprocesses/{spid}?signal=` → 204.
pub async fn signal(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path((id, spid)): Path<(String, String)>,
    q: QueryPairs,
) -> ApiResult<StatusCode> {
    let uuid = parse_uuid("operation", &id)?;
    svc.signal_subprocess(&caller, uuid, parse_spid(&spid)?, q.get("signal")).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /operations/{id}/subprocesses/{spid}/stdin` → 204.
pub async fn stdin(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path((id, spid)): Path<(String, String)>,
    JsonBody(req): JsonBody<StdinRequest>,
) -> ApiResult<StatusCode> {
    let uuid = parse_uuid("operation", &id)?;
    svc.write_subprocess_stdin(&caller, uuid, parse_spid(&spid)?, req).await?;
    Ok(StatusCode::NO_CONTENT)
}
