//! Operations endpoints: liveness, readiness, Prometheus metrics, OpenAPI.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use kernel::Problem;
use kernel::bus::stats::{self, BusStats};
use kernel::error::resource;
use kernel::metrics;
use kernel::migrate;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{OpenApi, ToSchema};

use crate::runtime::{LocalModule, Runtime};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health/live").route(web::get().to(live)))
        .service(resource("/health/ready").route(web::get().to(ready)))
        .service(resource("/metrics").route(web::get().to(prometheus)));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "colony",
        description = "A marketplace backend: catalog, cart, checkout, notification, delivery."
    ),
    paths(
        live,
        ready,
        prometheus,
        crate::admin::dead_letters,
        crate::admin::replay,
        crate::admin::modules
    )
)]
struct OpsApi;

/// The OpenAPI document of the operations endpoints and every local module.
pub fn openapi(runtime: &Runtime) -> utoipa::openapi::OpenApi {
    let mut doc = OpsApi::openapi();
    for m in &runtime.modules {
        doc.merge(m.module.openapi());
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    doc
}

#[derive(Serialize, ToSchema)]
pub struct Live {
    status: &'static str,
}

#[utoipa::path(get, path = "/health/live", tag = "operations", responses((status = 200, body = Live)))]
pub async fn live() -> web::Json<Live> {
    web::Json(Live { status: "live" })
}

/// Health of one local module.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModuleHealth {
    pub database: &'static str,
    pub migrated: bool,
    pub transport: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ModuleHealth {
    pub fn is_ready(&self) -> bool {
        self.database == "up" && self.migrated && self.transport == "up"
    }
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    status: &'static str,
    modules: BTreeMap<&'static str, ModuleHealth>,
}

/// Checks one module's database and migrations (blocking).
pub fn check_module(m: &LocalModule, transport_up: bool) -> ModuleHealth {
    let transport = if transport_up { "up" } else { "down" };
    let mut conn = match m.db.pool().get_timeout(Duration::from_secs(1)) {
        Ok(conn) => conn,
        Err(e) => {
            return ModuleHealth {
                database: "down",
                migrated: false,
                transport,
                error: Some(e.to_string()),
            };
        }
    };
    match migrate::has_pending(&mut conn, m.spec.migrations) {
        Ok(pending) => ModuleHealth {
            database: "up",
            migrated: !pending,
            transport,
            error: None,
        },
        Err(e) => ModuleHealth {
            database: "down",
            migrated: false,
            transport,
            error: Some(e.to_string()),
        },
    }
}

/// Health of every local module, checked off the async runtime.
pub async fn check_all(runtime: web::Data<Runtime>) -> BTreeMap<&'static str, ModuleHealth> {
    let result = web::block(move || {
        let up = runtime.transport.is_up();
        runtime
            .modules
            .iter()
            .map(|m| (m.spec.name, check_module(m, up)))
            .collect::<BTreeMap<_, _>>()
    })
    .await;
    result.unwrap_or_default()
}

#[utoipa::path(
    get, path = "/health/ready", tag = "operations",
    responses((status = 200, body = Ready), (status = 503, body = Problem))
)]
pub async fn ready(runtime: web::Data<Runtime>) -> HttpResponse {
    let modules = check_all(runtime).await;
    let failing: Vec<String> = modules
        .iter()
        .filter(|(_, h)| !h.is_ready())
        .map(|(name, h)| {
            let why = if h.database != "up" {
                "database unreachable"
            } else if !h.migrated {
                "migrations pending"
            } else {
                "transport down"
            };
            format!("{name} ({why})")
        })
        .collect();
    if failing.is_empty() {
        HttpResponse::Ok().json(Ready {
            status: "ready",
            modules,
        })
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("not ready: {}", failing.join(", ")),
        )
        .to_response()
    }
}

/// Event machinery figures of every local module (blocking).
pub fn bus_stats(runtime: &Runtime) -> Vec<(&'static str, Result<BusStats, String>)> {
    runtime
        .modules
        .iter()
        .map(|m| {
            let stats =
                m.db.pool()
                    .get_timeout(Duration::from_secs(1))
                    .map_err(|e| e.to_string())
                    .and_then(|mut conn| {
                        stats::read(&mut conn, m.spec.name, runtime.nats.is_some())
                            .map_err(|e| e.to_string())
                    });
            (m.spec.name, stats)
        })
        .collect()
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn prometheus(runtime: web::Data<Runtime>) -> HttpResponse {
    let rt = runtime.clone();
    let all = web::block(move || bus_stats(&rt)).await.unwrap_or_default();
    let mut out = String::new();
    runtime.metrics.render(&mut out);
    let heads: BTreeMap<&str, i64> = all
        .iter()
        .filter_map(|(name, s)| s.as_ref().ok().map(|s| (*name, s.last_sequence)))
        .collect();
    out.push_str("# TYPE colony_outbox_last_sequence gauge\n");
    for (module, last) in &heads {
        metrics::gauge(
            &mut out,
            "colony_outbox_last_sequence",
            &[("module", module)],
            *last,
        );
    }
    out.push_str("# TYPE colony_outbox_unrelayed gauge\n");
    for (module, stats) in &all {
        if let Ok(s) = stats {
            metrics::gauge(
                &mut out,
                "colony_outbox_unrelayed",
                &[("module", module)],
                s.unrelayed,
            );
        }
    }
    out.push_str("# TYPE colony_consumer_lag gauge\n");
    for (_, stats) in &all {
        for c in stats.iter().flat_map(|s| &s.consumers) {
            if let Some(head) = heads.get(c.source.as_str()) {
                let labels = [
                    ("consumer", c.consumer.as_str()),
                    ("source", c.source.as_str()),
                ];
                metrics::gauge(&mut out, "colony_consumer_lag", &labels, head - c.position);
            }
        }
    }
    out.push_str("# TYPE colony_consumer_retrying gauge\n");
    for (_, stats) in &all {
        for c in stats.iter().flat_map(|s| &s.consumers) {
            let labels = [
                ("consumer", c.consumer.as_str()),
                ("source", c.source.as_str()),
            ];
            metrics::gauge(&mut out, "colony_consumer_retrying", &labels, c.retrying);
        }
    }
    out.push_str("# TYPE colony_dead_letters gauge\n");
    for (module, stats) in &all {
        if let Ok(s) = stats {
            metrics::gauge(
                &mut out,
                "colony_dead_letters",
                &[("module", module)],
                s.dead_letters,
            );
        }
    }
    out.push_str("# TYPE colony_module_up gauge\n");
    for (module, stats) in &all {
        metrics::gauge(
            &mut out,
            "colony_module_up",
            &[("module", module)],
            i64::from(stats.is_ok()),
        );
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out)
}
