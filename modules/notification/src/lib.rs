//! The notification module: tells customers what happened to their orders, once
//! per kind per order, on a channel behind the `Sender` trait. A failing channel
//! stalls only this module's consumer; nothing upstream waits for it.

mod handlers;
mod http;
mod schema;
pub mod sender;

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

use crate::sender::{LogSender, Sender, SmtpSender, SmtpSettings, WebhookSender, WebhookSettings};

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
    consumes: &["checkout", "delivery"],
    build,
};

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Channel {
    #[default]
    Log,
    Smtp,
    Webhook,
}

/// `modules.notification` settings besides `database_url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    channel: Channel,
    smtp: Option<SmtpSettings>,
    webhook: Option<WebhookSettings>,
}

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let settings: Settings = ctx.settings(MODULE)?;
    let sender: Arc<dyn Sender> = match settings.channel {
        Channel::Log => Arc::new(LogSender),
        Channel::Smtp => {
            let smtp = settings.smtp.ok_or_else(|| {
                anyhow::anyhow!("modules.notification.smtp is required for the smtp channel")
            })?;
            Arc::new(SmtpSender::new(&smtp)?)
        }
        Channel::Webhook => {
            let webhook = settings.webhook.ok_or_else(|| {
                anyhow::anyhow!("modules.notification.webhook is required for the webhook channel")
            })?;
            Arc::new(WebhookSender::new(
                &webhook,
                tokio::runtime::Handle::try_current()?,
            )?)
        }
    };
    Ok(Box::new(Notification { db: ctx.db, sender }))
}

struct Notification {
    db: Db,
    sender: Arc<dyn Sender>,
}

#[derive(OpenApi)]
#[openapi(paths(http::list_notifications))]
struct NotificationApi;

impl Module for Notification {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, cfg: &mut web::ServiceConfig, _ports: &Ports) {
        http::routes(cfg, self.db.clone());
    }

    fn consumers(&self) -> Vec<Consumer> {
        let handler = Arc::new(handlers::Notify {
            sender: self.sender.clone(),
        });
        vec![
            Consumer {
                name: MODULE,
                source: "checkout",
                events: &[
                    contracts::checkout::OrderConfirmed::NAME,
                    contracts::checkout::OrderRejected::NAME,
                    contracts::checkout::OrderCancelled::NAME,
                ],
                prompt: false,
                handler: handler.clone(),
            },
            Consumer {
                name: MODULE,
                source: "delivery",
                events: &[
                    contracts::delivery::ShipmentDispatched::NAME,
                    contracts::delivery::ShipmentDelivered::NAME,
                ],
                prompt: false,
                handler,
            },
        ]
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        NotificationApi::openapi()
    }
}
