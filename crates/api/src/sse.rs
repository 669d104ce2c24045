//! `GET /operations/{id}/events`: the event log as Server-Sent Events, gzipped frame by
//! frame when the client accepts it (each frame is flushed with `Z_SYNC_FLUSH`, so a
//! compressed stream never holds an event back).

use std::convert::Infallible;
use std::io::Write as _;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use boxwood_core::Service;
use flate2::Compression;
use flate2::write::GzEncoder;
use futures::StreamExt;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, QueryPairs, parse_uuid};

/// Idle streams get a `: keepalive` comment this often (for proxies).
const KEEPALIVE: Duration = Duration::from_secs(15);

pub async fn operation_events(
    State(svc): State<Service>,
    Auth(caller): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryPairs,
) -> ApiResult<Response> {
    let uuid = parse_uuid("operation", &id)?;
    let non_negative = |key: &str, v: Option<i64>| match v {
        Some(n) if n < 0 => Err(ApiError::bad_request(format!("{key} must be >= 0"))),
        v => Ok(v),
    };
    let mut since = non_negative("since", q.int("since")?)?;
    if let Some(h) = headers.get("last-event-id") {
        let v = h.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok());
        since = Some(
            non_negative("Last-Event-Id", v)?
                .ok_or_else(|| ApiError::bad_request("Last-Event-Id must be an integer"))?,
        );
    }
    let spid = non_negative("spid", q.int("spid")?)?;
    let events = svc.events(&caller, uuid, since, spid, q.flag("follow")?).await?;
    let frames = events.flat_map(|item| {
        let frames = match item {
            Ok(ev) => {
                let data = serde_json::to_string(&ev).unwrap_or_default();
                vec![Event::default().id(ev.id.to_string()).event(ev.kind.as_str()).data(data)]
            }
            Err(e) => {
                tracing::error!(error = %e, "event stream failed");
                vec![
                    Event::default().comment("stream ended with error, retry since last event id"),
                    Event::default().event("sse_error").data("event log read failed"),
                ]
            }
        };
        futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>))
    });
    let sse = Sse::new(frames).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"));
    let response = sse.into_response();
    Ok(if accepts_gzip(&headers) { gzip_per_frame(response) } else { response })
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, with a non-zero q).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                p.trim().strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !q_zero
        },
    )
}

/// Re-encodes a streaming body as gzip, flushing after every chunk (each chunk of an SSE body
/// is one frame).
fn gzip_per_frame(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts.headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    parts.headers.remove(header::CONTENT_LENGTH);
    let state = (Some(GzEncoder::new(Vec::new(), Compression::fast())), body.into_data_stream());
    let stream = futures::stream::unfold(state, |(encoder, mut body)| async move {
        let mut encoder = encoder?;
        let out = match body.next().await {
            Some(Ok(chunk)) => {
                let written = encoder.write_all(&chunk).and_then(|()| encoder.flush());
                let bytes = Bytes::from(std::mem::take(encoder.get_mut()));
                return Some((written.map(|()| bytes), (Some(encoder), body)));
            }
            Some(Err(e)) => Err(std::io::Error::other(e)),
            None => encoder.finish().map(Bytes::from),
        };
        Some((out, (None, body)))
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn gzip_acceptance() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate")));
        assert!(accepts_gzip(&h("identity;q=0.5, GZIP;q=1")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("br")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn every_frame_is_decodable_as_soon_as_it_is_sent() {
        let frames = ["id: 0\nevent: a\ndata: {}\n\n", "id: 1\nevent: b\ndata: {}\n\n"];
        let body = Body::from_stream(futures::stream::iter(frames.map(|f| Ok::<_, Infallible>(Bytes::from(f)))));
        let response = gzip_per_frame(Response::new(body));
        assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
        let mut chunks = response.into_body().into_data_stream();
        let mut seen = Vec::new();
        for want in frames {
            seen.extend_from_slice(&chunks.next().await.unwrap().unwrap());
            // A decoder fed only what was sent so far yields the whole frame.
            let mut decoder = flate2::write::GzDecoder::new(Vec::new());
            decoder.write_all(&seen).unwrap();
            decoder.flush().unwrap();
            assert!(String::from_utf8_lossy(decoder.get_ref()).ends_with(want));
        }
        while let Some(chunk) = chunks.next().await {
            seen.extend_from_slice(&chunk.unwrap());
        }
        let mut all = String::new();
        flate2::read::GzDecoder::new(&seen[..]).read_to_string(&mut all).unwrap();
        assert_eq!(all, frames.concat());
    }
}
