//! Route handlers: each parses its request, makes one core call and shapes the response.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use boxwood_core::clock::{now_us, parse_time_filter};
use boxwood_core::model::{DirectoryStateRequest, FileList, ImageList, SpawnRequest, TagRequest};
use boxwood_core::{ImageQuery, OperationQuery, Page, Service};
use futures::TryStreamExt;
use tokio_util::io::StreamReader;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, QueryPairs, parse_uuid};

fn page(q: &QueryPairs) -> ApiResult<Page> {
    Ok(Page::new(q.int("limit")?, q.int("offset")?)?)
}

fn time_filter(q: &QueryPairs, key: &str) -> ApiResult<Option<i64>> {
    let now = now_us();
    Ok(q.get(key).filter(|v| !v.is_empty()).map(|v| parse_time_filter(key, v, now)).transpose()?)
}

pub(crate) fn location(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("/"))
}

pub async fn whoami(State(svc): State<Service>, Auth(caller): Auth) -> impl IntoResponse {
    Json(svc.whoami(&caller))
}

pub async fn list_images(State(svc): State<Service>, Auth(caller): Auth, q: QueryPairs) -> ApiResult<Response> {
    let uuid = q.text("uuid").map(|u| parse_uuid("image", &u)).transpose()?;
    let query = ImageQuery {
        tagged: q.flag("tagged")?,
        tag_prefix: q.text("tag"),
        uuid,
        since_us: time_filter(&q, "since")?,
        until_us: time_filter(&q, "until")?,
    };
    let images = svc.list_images(&caller, query, page(&q)?).await?;
    Ok(Json(ImageList { images }).into_response())
}

pub async fn spawn_instance(
    State(svc): State<Service>,
    Auth(caller): Auth,
    JsonBody(req): JsonBody<SpawnRequest>,
) -> ApiResult<Response> {
    let resp = svc.spawn_instance(&caller, req).await?;
    let loc = location(&format!("/v1/operations/{}", resp.uuid));
    Ok((StatusCode::CREATED, [(header::LOCATION, loc)], Json(resp)).into_response())
}

pub async fn list_operations(State(svc): State<Service>, Auth(caller): Auth, q: QueryPairs) -> ApiResult<Response> {
    let query = OperationQuery {
        status: q.text("status"),
        kind: q.text("kind"),
        since_us: time_filter(&q, "since")?,
        until_us: time_filter(&q, "until")?,
    };
    let ops = svc.list_operations(&caller, query, page(&q)?).await?;
    Ok(Json(ops).into_response())
}

pub async fn get_operation(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("operation", &id)?;
    let op = svc.get_operation(&caller, uuid, q.flag("inflight")?).await?;
    let mut resp = Json(&op).into_response();
    if let Some(secs) = op.retry_after_secs() {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Ok(resp)
}

pub async fn cancel_operation(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let uuid = parse_uuid("operation", &id)?;
    svc.cancel_operation(&caller, uuid).await?;
    Ok(StatusCode::ACCEPTED)
}

/// SSE event log. Frames are `id`/`event`/`data` with the event JSON on one line; a failure
/// after the 200 ends the stream with the contract's `sse_error` frame.
pub async fn inspect_root_redirect() -> Response {
    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location("/v1/inspect/"))]).into_response()
}

/// `GET /inspect/?tag=T` → 302 with a `Location` relative to `/v1/inspect/`.
pub async fn find_image_by_tag(State(svc): State<Service>, Auth(caller): Auth, q: QueryPairs) -> ApiResult<Response> {
    let tag = q.text("tag").ok_or_else(|| ApiError::bad_request("tag is required"))?;
    let uuid = svc.resolve_tag(&caller, &tag).await?;
    Ok((StatusCode::FOUND, [(header::LOCATION, location(&format!("{uuid}/")))]).into_response())
}

pub async fn inspect_image_redirect(Path(id): Path<String>) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location(&format!("/v1/inspect/{uuid}/")))])
        .into_response())
}

pub async fn inspect_image(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    Ok(Json(svc.get_image(&caller, uuid).await?).into_response())
}

/// `POST /files`: the raw body, chunked or not, streamed to disk.
pub async fn upload_file(State(svc): State<Service>, Auth(caller): Auth, body: Body) -> ApiResult<Response> {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader = StreamReader::new(stream);
    let file = svc.upload_file(&caller, &mut reader).await?;
    Ok((StatusCode::CREATED, Json(file)).into_response())
}

pub async fn list_files(State(svc): State<Service>, Auth(caller): Auth, q: QueryPairs) -> ApiResult<Response> {
    let files = svc.list_files(&caller, time_filter(&q, "since")?, time_filter(&q, "until")?, page(&q)?).await?;
    Ok(Json(FileList { files }).into_response())
}

/// `GET` and (through axum's HEAD handling, body stripped) `HEAD /files/{sha256}`.
pub async fn get_file(State(svc): State<Service>, Auth(caller): Auth, Path(sha): Path<String>) -> ApiResult<Response> {
    Ok(Json(svc.get_file(&caller, &sha).await?).into_response())
}

/// Boxwood extension: `POST /v1/directory-states`.
pub async fn create_directory_state(
    State(svc): State<Service>,
    Auth(caller): Auth,
    JsonBody(req): JsonBody<DirectoryStateRequest>,
) -> ApiResult<Response> {
    let state = svc.create_directory_state(&caller, req).await?;
    let loc = location(&format!("/v1/directory-states/{}", state.id));
    Ok((StatusCode::CREATED, [(header::LOCATION, loc)], Json(state)).into_response())
}

/// Boxwood extension: `GET /v1/directory-states/{id}`.
pub async fn get_directory_state(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id =
        id.parse::<i64>().map_err(|_| ApiError::bad_request(format!("directory state id {id:?} is not an integer")))?;
    Ok(Json(svc.get_directory_state(&caller, id).await?).into_response())
}

pub async fn set_image_tag(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TagRequest>,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    Ok(Json(svc.set_image_tag(&caller, uuid, &body.tag).await?).into_response())
}

pub async fn delete_image_tag(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<StatusCode> {
    let uuid = parse_uuid("image", &id)?;
    svc.delete_image_tag(&caller, uuid, q.text("tag").as_deref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Boxwood extension: an image's ancestors and children.
pub async fn image_lineage(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    Ok(Json(svc.image_lineage(&caller, uuid).await?).into_response())
}

/// `POST /images/import`: 201 with the operation id; clients poll the operation.
pub async fn import_image(
    State(svc): State<Service>,
    Auth(caller): Auth,
    JsonBody(req): JsonBody<boxwood_core::model::ImportRequest>,
) -> ApiResult<Response> {
    let created = svc.import_image(&caller, req).await?;
    let loc = location(&format!("/v1/operations/{}", created.uuid));
    Ok((StatusCode::CREATED, [(header::LOCATION, loc)], Json(created)).into_response())
}

/// Liveness: the process answers. No token: orchestrators probe without one.
pub async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Readiness: 200 when the server can take work, else 503 in the error envelope naming the
/// failing checks. No token, and nothing but check states.
pub async fn readyz(State(svc): State<Service>) -> Response {
    let r = svc.readiness().await;
    if r.ready {
        return Json(r).into_response();
    }
    let body = serde_json::json!({
        "error": format!("not ready: {}", r.checks.failing().join(", ")),
        "status": 503,
        "ready": false,
        "checks": r.checks,
    });
    // As every other 503 here: a probe or a client with a retry policy knows when to look again.
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, HeaderValue::from_static("1"))], Json(body))
        .into_response()
}
