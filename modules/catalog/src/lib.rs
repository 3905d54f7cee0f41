//! The catalog module: products, prices and stock. It publishes what changes so
//! other modules keep their own read models; it never reads theirs.

mod domain;
mod handlers;
mod http;
mod schema;
mod store;

pub use http::{CatalogError, CreateProduct, list_product};

use std::sync::Arc;

use actix_web::web;
use contracts::Event;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::bus::Consumer;
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec, Ports};
use serde::Deserialize;
use utoipa::OpenApi;

pub const MODULE: &str = "catalog";

const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/catalog/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/catalog/postgres");

/// How the composition root finds this module.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: MODULE,
    migrations: Migrations {
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    },
    consumes: &["checkout", "delivery"],
    build,
};

/// `modules.catalog` settings besides `database_url` (none yet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let _: Settings = ctx.settings(MODULE)?;
    let products = http::product_lookups(ctx.db.clone(), ctx.metrics.clone());
    Ok(Box::new(Catalog {
        db: ctx.db,
        products,
    }))
}

struct Catalog {
    db: Db,
    /// Shared by every HTTP worker, so their reads of a product go together.
    products: http::ProductLookups,
}

#[derive(OpenApi)]
#[openapi(paths(
    http::create_product,
    http::list_products,
    http::get_product,
    http::update_product,
    http::set_stock,
    http::delist_product
))]
struct CatalogApi;

impl Module for Catalog {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, cfg: &mut web::ServiceConfig, _ports: &Ports) {
        http::routes(cfg, self.db.clone(), self.products.clone());
    }

    fn consumers(&self) -> Vec<Consumer> {
        vec![
            Consumer {
                name: MODULE,
                source: "checkout",
                events: &[
                    contracts::checkout::OrderPlaced::NAME,
                    contracts::checkout::OrderRejected::NAME,
                    contracts::checkout::OrderCancelled::NAME,
                ],
                // The reservation is the saga's first step.
                prompt: true,
                handler: Arc::new(handlers::CheckoutEvents),
            },
            Consumer {
                name: MODULE,
                source: "delivery",
                events: &[contracts::delivery::ShipmentDispatched::NAME],
                prompt: false,
                handler: Arc::new(handlers::DeliveryEvents),
            },
        ]
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        CatalogApi::openapi()
    }
}
