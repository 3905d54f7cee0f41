//! The per-request middleware: a span continuing the caller's trace, the request
//! context handlers publish with, and request metrics.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, web};
use kernel::context::RequestContext;
use kernel::metrics::Metrics;
use kernel::trace::TraceContext;
use tracing::Instrument;
use uuid::Uuid;

const CORRELATION: &str = "x-correlation-id";

/// The module a path belongs to, for metric labels.
fn module_of(path: &str) -> &str {
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        let segment = rest.split('/').next().unwrap_or("");
        return match segment {
            "notifications" => "notification",
            "" => "none",
            s => s,
        };
    }
    "ops"
}

pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = parent.map_or_else(TraceContext::new_root, |p| p.child());
    let correlation_id = req
        .headers()
        .get(CORRELATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap_or_else(Uuid::now_v7);
    req.extensions_mut().insert(RequestContext {
        correlation_id,
        trace,
    });
    let metrics = req.app_data::<web::Data<Arc<Metrics>>>().cloned();
    let method = req.method().to_string();
    let span = tracing::info_span!(
        "http.request",
        http.method = %method,
        http.path = %req.path(),
        http.status = tracing::field::Empty,
        trace_id = %trace.trace_id_hex(),
        span_id = %trace.span_id_hex(),
        parent_span_id = parent.map(|p| p.span_id_hex()).unwrap_or_default(),
        correlation_id = %correlation_id,
    );
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let status = res.status();
    span.record("http.status", status.as_u16());
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_string());
    if let Some(metrics) = metrics {
        let module = module_of(&route).to_string();
        let status = status.as_u16().to_string();
        let labels = [
            ("module", module.as_str()),
            ("method", method.as_str()),
            ("route", route.as_str()),
            ("status", status.as_str()),
        ];
        metrics.inc("colony_http_requests_total", &labels, 1);
        metrics.observe(
            "colony_http_request_duration_seconds",
            &[("module", module.as_str()), ("route", route.as_str())],
            elapsed,
        );
    }
    if status.is_server_error() {
        tracing::error!(parent: &span, elapsed_ms = elapsed * 1000.0, "request failed");
    } else {
        tracing::info!(parent: &span, elapsed_ms = elapsed * 1000.0, "request handled");
    }
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert(HeaderName::from_static("traceparent"), v);
    }
    if let Ok(v) = HeaderValue::from_str(&correlation_id.to_string()) {
        headers.insert(HeaderName::from_static(CORRELATION), v);
    }
    Ok(res)
}
