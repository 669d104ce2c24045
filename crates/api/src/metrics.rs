//! `GET /metrics`: the Prometheus text exposition of what the core records (the `metrics`
//! facade; the recorder is installed once per process). Any valid token may scrape: the series
//! are server-wide, without namespaces, paths or ids.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use boxwood_core::Service;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;

/// Histogram buckets of the `*_seconds` series: a pooled start is well under a second, a
/// queued or long run minutes.
const SECONDS_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (first call; later calls return the same handle), so
/// what happens from then on is counted. `None` if another recorder was installed first.
pub fn install_metrics() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder);
            match installed {
                Ok(handle) => {
                    boxwood_core::metrics::describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are off: a recorder is already installed");
                    None
                }
            }
        })
        .as_ref()
}

pub async fn metrics(State(svc): State<Service>, Auth(_): Auth) -> ApiResult<Response> {
    let handle = install_metrics().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "metrics are off"))?;
    svc.sample_metrics().await;
    handle.run_upkeep();
    let mut response = handle.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(response)
}
