//! The notification module. Wired into the binary with its own database and migrations;
//! its routes and event handlers arrive with the marketplace flow.

use actix_web::web;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec};
use serde::Deserialize;
use utoipa::OpenApi;

pub const MODULE: &str = "notification";

const SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/notification/sqlite");
const POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/notification/postgres");

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

/// `modules.notification` settings besides `database_url` (none yet).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let _: Settings = ctx.settings(MODULE)?;
    Ok(Box::new(Notification { _db: ctx.db }))
}

struct Notification {
    _db: Db,
}

#[derive(OpenApi)]
struct NotificationApi;

impl Module for Notification {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, _cfg: &mut web::ServiceConfig) {}

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        NotificationApi::openapi()
    }
}
