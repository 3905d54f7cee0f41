//! Operators' endpoints (admin role): dead letters and the state of each module.

use actix_web::{HttpResponse, web};
use kernel::Problem;
use kernel::auth::{Caller, Role};
use kernel::bus::dead_letters::{self, DeadLetter, ReplayError};
use kernel::bus::stats::BusStats;
use kernel::db::write_tx;
use kernel::error::resource;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ops;
use crate::runtime::Runtime;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1/admin")
            .service(resource("/dead-letters").route(web::get().to(dead_letters)))
            .service(resource("/dead-letters/{id}/replay").route(web::post().to(replay)))
            .service(resource("/modules").route(web::get().to(modules))),
    );
}

/// A parked event and the module whose consumer parked it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub module: String,
    #[serde(flatten)]
    pub letter: DeadLetter,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    pub items: Vec<DeadLetterView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ModuleFilter {
    /// Only this module's dead letters.
    pub module: Option<String>,
}

fn unavailable(e: impl std::fmt::Display) -> Problem {
    Problem::unavailable("database_unavailable", e.to_string())
}

#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters", tag = "admin", params(ModuleFilter),
    responses((status = 200, body = DeadLetterList), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = []))
)]
pub async fn dead_letters(
    caller: Caller,
    runtime: web::Data<Runtime>,
    filter: web::Query<ModuleFilter>,
) -> Result<web::Json<DeadLetterList>, Problem> {
    caller.require(&[Role::Admin])?;
    let wanted = filter.into_inner().module;
    if let Some(name) = wanted.as_ref().filter(|n| runtime.module(n).is_none()) {
        return Err(Problem::not_found(
            "module_not_local",
            format!("module {name:?} does not run in this process"),
        ));
    }
    let items = web::block(move || {
        let mut items = Vec::new();
        for m in &runtime.modules {
            if wanted.as_deref().is_some_and(|w| w != m.spec.name) {
                continue;
            }
            let mut conn = m.db.pool().get().map_err(unavailable)?;
            for letter in dead_letters::list(&mut conn).map_err(unavailable)? {
                items.push(DeadLetterView {
                    module: m.spec.name.to_string(),
                    letter,
                });
            }
        }
        Ok::<_, Problem>(items)
    })
    .await
    .map_err(|e| Problem::internal(&e))??;
    Ok(web::Json(DeadLetterList { items }))
}

#[utoipa::path(
    post, path = "/api/v1/admin/dead-letters/{id}/replay", tag = "admin",
    params(("id" = String, Path, description = "dead letter id")),
    responses((status = 200, body = DeadLetterView), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = []))
)]
pub async fn replay(
    caller: Caller,
    runtime: web::Data<Runtime>,
    id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    caller.require(&[Role::Admin])?;
    let id = id.into_inner();
    let rt = runtime.clone();
    let (module, letter) = web::block(move || {
        for m in &rt.modules {
            let mut conn = m.db.pool().get().map_err(unavailable)?;
            match write_tx(&mut conn, |conn| dead_letters::replay(conn, &id)) {
                Ok(letter) => return Ok((m.spec.name, letter)),
                Err(ReplayError::NotFound(_)) => continue,
                Err(e @ ReplayError::AlreadyReplayed(_)) => {
                    return Err(Problem::conflict("already_replayed", e.to_string()));
                }
                Err(ReplayError::Query(e)) => return Err(Problem::internal(&e)),
            }
        }
        Err(Problem::not_found(
            "dead_letter_not_found",
            format!("no dead letter {id}"),
        ))
    })
    .await
    .map_err(|e| Problem::internal(&e))??;
    if let Some(m) = runtime.module(module) {
        m.db.nudge_consumers();
    }
    tracing::info!(dead_letter.id = %letter.id, module, "dead letter replayed");
    Ok(HttpResponse::Ok().json(DeadLetterView {
        module: module.to_string(),
        letter,
    }))
}

/// One local module as operators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleView {
    pub module: String,
    /// `ready` or `failing`.
    pub status: String,
    pub health: ops::ModuleHealth,
    pub bus: Option<BusStats>,
    /// Per consumer and source: events published but not yet handled.
    pub consumer_lag: Vec<ConsumerLag>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerLag {
    pub consumer: String,
    pub source: String,
    pub lag: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleList {
    pub items: Vec<ModuleView>,
}

#[utoipa::path(
    get, path = "/api/v1/admin/modules", tag = "admin",
    responses((status = 200, body = ModuleList), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = []))
)]
pub async fn modules(
    caller: Caller,
    runtime: web::Data<Runtime>,
) -> Result<web::Json<ModuleList>, Problem> {
    caller.require(&[Role::Admin])?;
    let items = web::block(move || {
        let up = runtime.transport.is_up();
        let stats = ops::bus_stats(&runtime);
        let head_of = |source: &str| {
            stats
                .iter()
                .find(|(name, _)| *name == source)
                .and_then(|(_, s)| s.as_ref().ok().map(|s| s.last_sequence))
        };
        runtime
            .modules
            .iter()
            .zip(stats.iter())
            .map(|(m, (_, bus))| {
                let health = ops::check_module(m, up);
                let bus = bus.as_ref().ok().cloned();
                let consumer_lag = bus
                    .iter()
                    .flat_map(|b| &b.consumers)
                    .map(|c| ConsumerLag {
                        consumer: c.consumer.clone(),
                        source: c.source.clone(),
                        lag: head_of(&c.source).map(|h| h - c.position),
                    })
                    .collect();
                ModuleView {
                    module: m.spec.name.to_string(),
                    status: if health.is_ready() {
                        "ready"
                    } else {
                        "failing"
                    }
                    .to_string(),
                    health,
                    bus,
                    consumer_lag,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Problem::internal(&e))?;
    Ok(web::Json(ModuleList { items }))
}
