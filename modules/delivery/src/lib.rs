//! The delivery module: a shipment per confirmed order, moved by operators (or a
//! simulated carrier) from preparing to dispatched to delivered. Its state decides
//! whether a cancellation can still be granted.

mod carrier;
mod domain;
mod handlers;
mod http;
mod schema;
mod shipping;
mod store;

use std::sync::Arc;

use actix_web::web;
use contracts::Event;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::bus::{BoxFuture, Consumer};
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec, Ports};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::OpenApi;

pub const MODULE: &str = "delivery";

const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/delivery/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/delivery/postgres");

/// How the composition root finds this module.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: MODULE,
    migrations: Migrations {
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    },
    consumes: &["checkout"],
    build,
};

/// `modules.delivery` settings besides `database_url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    carrier: carrier::CarrierSettings,
}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let settings: Settings = ctx.settings(MODULE)?;
    Ok(Box::new(Delivery {
        db: ctx.db,
        carrier: settings.carrier,
    }))
}

struct Delivery {
    db: Db,
    carrier: carrier::CarrierSettings,
}

#[derive(OpenApi)]
#[openapi(paths(
    http::list_shipments,
    http::get_shipment,
    http::dispatch,
    http::deliver
))]
struct DeliveryApi;

impl Module for Delivery {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, cfg: &mut web::ServiceConfig, _ports: &Ports) {
        http::routes(cfg, self.db.clone());
    }

    fn consumers(&self) -> Vec<Consumer> {
        vec![Consumer {
            name: MODULE,
            source: "checkout",
            events: &[
                contracts::checkout::OrderConfirmed::NAME,
                contracts::checkout::CancellationRequested::NAME,
            ],
            prompt: false,
            handler: Arc::new(handlers::CheckoutEvents),
        }]
    }

    fn tasks(
        &self,
        _ports: &Ports,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<BoxFuture<'static, ()>> {
        if !self.carrier.enabled {
            return Vec::new();
        }
        vec![Box::pin(carrier::run(
            self.db.clone(),
            self.carrier.clone(),
            shutdown,
        ))]
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        DeliveryApi::openapi()
    }
}
