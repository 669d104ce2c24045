//! `/inspect/{uuid}/…` handlers: reading an image without starting a VM.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use boxwood_core::Service;
use boxwood_core::inspect::{GrepCase, GrepRequest};
use futures::StreamExt;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, QueryPairs, parse_uuid};

/// The required `path` parameter; relative paths are read from the image root.
fn image_path(q: &QueryPairs) -> ApiResult<String> {
    let p = q.get("path").filter(|p| !p.is_empty()).ok_or_else(|| ApiError::bad_request("path is required"))?;
    Ok(if p.starts_with('/') { p.to_owned() } else { format!("/{p}") })
}

pub async fn list(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let path = image_path(&q)?;
    if q.flag("text")? {
        let text = svc.inspect_list_text(&caller, uuid, path).await?;
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    Ok(Json(svc.inspect_list(&caller, uuid, path).await?).into_response())
}

/// Headers of `download` and its HEAD check.
fn file_headers(q: &QueryPairs, size: u64) -> ApiResult<[(header::HeaderName, HeaderValue); 2]> {
    let kind = if q.flag("text")? { "text/plain; charset=utf-8" } else { "application/octet-stream" };
    Ok([(header::CONTENT_TYPE, HeaderValue::from_static(kind)), (header::CONTENT_LENGTH, HeaderValue::from(size))])
}

/// Headers of `archive` and its HEAD check.
fn tar_headers(path: &str) -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar")),
        (header::CONTENT_DISPOSITION, disposition(path)),
    ]
}

/// A file's bytes, streamed from the layer on disk.
pub async fn download(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let (size, rx) = svc.inspect_download(&caller, uuid, image_path(&q)?).await?;
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).map(|chunk| chunk.map(Bytes::from)));
    Ok((file_headers(&q, size)?, body).into_response())
}

pub async fn head_download(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let size = svc.inspect_file_size(&caller, uuid, image_path(&q)?).await?;
    Ok((StatusCode::OK, file_headers(&q, size)?).into_response())
}

/// `attachment; filename="etc.tar"` for `/etc`, `bin_true.tar` for `/bin/true`.
fn disposition(path: &str) -> HeaderValue {
    let name = path.trim_matches('/').replace('/', "_").replace(['"', '\\'], "_");
    let name = if name.is_empty() { "rootfs".to_owned() } else { name };
    HeaderValue::from_str(&format!("attachment; filename=\"{name}.tar\""))
        .unwrap_or(HeaderValue::from_static("attachment"))
}

/// A PAX tar of a file or directory, streamed; a failure midway aborts the body so the
/// client never mistakes a cut archive for a complete one.
pub async fn archive(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let path = image_path(&q)?;
    let rx = svc.inspect_archive(&caller, uuid, path.clone()).await?;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|chunk| chunk.map(Bytes::from));
    Ok((tar_headers(&path), Body::from_stream(stream)).into_response())
}

pub async fn head_archive(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let path = image_path(&q)?;
    svc.inspect_check_archive(&caller, uuid, path.clone()).await?;
    Ok((StatusCode::OK, tar_headers(&path)).into_response())
}

pub async fn grep(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("image", &id)?;
    let patterns = q.all("pattern");
    if patterns.is_empty() {
        return Err(ApiError::bad_request("pattern is required"));
    }
    let non_negative = |key: &str| -> ApiResult<Option<u64>> {
        q.int(key)?
            .map(|v| u64::try_from(v).map_err(|_| ApiError::bad_request(format!("{key} must be >= 0"))))
            .transpose()
    };
    let mut req = GrepRequest { patterns, ..GrepRequest::default() };
    let paths = q.all("path");
    if !paths.is_empty() {
        req.paths = paths.into_iter().map(|p| if p.starts_with('/') { p } else { format!("/{p}") }).collect();
    }
    req.globs = q.all("glob");
    req.max_count = non_negative("max_count")?;
    if let Some(t) = non_negative("max_total")? {
        req.max_total = t;
    }
    req.before = non_negative("before")?.unwrap_or(0) as usize;
    req.after = non_negative("after")?.unwrap_or(0) as usize;
    if let Some(case) = q.text("case") {
        req.case = case.parse::<GrepCase>().map_err(|_| {
            ApiError::bad_request(format!("case must be sensitive, insensitive or smart, got {case:?}"))
        })?;
    }
    Ok(Json(svc.inspect_grep(&caller, uuid, req).await?).into_response())
}
