//! The cart module: one cart per customer, priced from cart's own read model of the
//! catalog (kept from catalog events; adding an item never asks catalog). Offers
//! the `CartQueries` port that checkout uses at placement.

mod domain;
mod handlers;
mod http;
mod schema;
mod store;

use std::sync::Arc;

use actix_web::web;
use contracts::Event;
use contracts::cart::{CallContext, CartQueries, CartSnapshot, PortError, PortFuture};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::bus::Consumer;
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec, Ports};
use serde::Deserialize;
use utoipa::OpenApi;

pub const MODULE: &str = "cart";

const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/cart/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/cart/postgres");

/// How the composition root finds this module.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: MODULE,
    migrations: Migrations {
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    },
    consumes: &["catalog", "checkout"],
    build,
};

/// `modules.cart` settings besides `database_url` (none yet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let _: Settings = ctx.settings(MODULE)?;
    Ok(Box::new(Cart { db: ctx.db }))
}

struct Cart {
    db: Db,
}

#[derive(OpenApi)]
#[openapi(paths(http::get_cart, http::set_item, http::remove_item))]
struct CartApi;

impl Module for Cart {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, cfg: &mut web::ServiceConfig, _ports: &Ports) {
        http::routes(cfg, self.db.clone());
    }

    fn consumers(&self) -> Vec<Consumer> {
        vec![
            Consumer {
                name: MODULE,
                source: "catalog",
                // Not stock changes: a cart orders what is listed, and catalog's
                // reservation is where stock is checked.
                events: &[
                    contracts::catalog::ProductListed::NAME,
                    contracts::catalog::ProductDetailsChanged::NAME,
                    contracts::catalog::PriceChanged::NAME,
                    contracts::catalog::ProductDelisted::NAME,
                ],
                prompt: false,
                handler: Arc::new(handlers::CatalogEvents),
            },
            Consumer {
                name: MODULE,
                source: "checkout",
                events: &[contracts::checkout::OrderConfirmed::NAME],
                // A customer who sees the order confirmed looks at the cart next.
                prompt: true,
                handler: Arc::new(handlers::CheckoutEvents),
            },
        ]
    }

    fn provide_ports(&self, ports: &mut Ports) {
        let port: Arc<dyn CartQueries> = Arc::new(LocalCartQueries {
            db: self.db.clone(),
        });
        ports.provide(port);
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        CartApi::openapi()
    }
}

/// `CartQueries` answered from this process's cart database.
struct LocalCartQueries {
    db: Db,
}

impl CartQueries for LocalCartQueries {
    fn snapshot<'a>(
        &'a self,
        customer_id: &'a str,
        _call: &'a CallContext,
    ) -> PortFuture<'a, CartSnapshot> {
        let customer = customer_id.to_string();
        Box::pin(async move {
            self.db
                .read(move |conn| http::snapshot(conn, &customer))
                .await
                .map_err(|e| PortError::Unavailable {
                    module: MODULE.to_string(),
                    detail: e.to_string(),
                })
        })
    }
}
