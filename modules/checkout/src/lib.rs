//! The checkout module. Wired into the binary with its own database and migrations;
//! its routes and event handlers arrive with the marketplace flow.

use actix_web::web;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec};
use serde::Deserialize;
use utoipa::OpenApi;

pub const MODULE: &str = "checkout";

const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/checkout/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/checkout/postgres");

/// How the composition root finds this module.
pub const SPEC: ModuleSpec = ModuleSpec {
    name: MODULE,
    migrations: Migrations {
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    },
    consumes: &[],
    build,
};

/// `modules.checkout` settings besides `database_url` (none yet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let _: Settings = ctx.settings(MODULE)?;
    Ok(Box::new(Checkout { _db: ctx.db }))
}

struct Checkout {
    _db: Db,
}

#[derive(OpenApi)]
struct CheckoutApi;

impl Module for Checkout {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, _cfg: &mut web::ServiceConfig) {}

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        CheckoutApi::openapi()
    }
}
