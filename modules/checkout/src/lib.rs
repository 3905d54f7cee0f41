//! The checkout module: orders and the saga that settles them — stock reserved by
//! catalog, payment through the `PaymentGateway` port, shipment by delivery,
//! cancellation before dispatch. It reads the cart through the `CartQueries` port.

mod domain;
mod handlers;
mod http;
mod payment;
mod schema;
mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web;
use contracts::Event;
use contracts::cart::CartQueries;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use kernel::Db;
use kernel::bus::{BoxFuture, Consumer};
use kernel::migrate::Migrations;
use kernel::module::{Module, ModuleContext, ModuleSpec, Ports};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use utoipa::OpenApi;

pub use payment::{PaymentGateway, PaymentSettings};

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
    consumes: &["catalog", "delivery"],
    build,
};

/// `modules.checkout` settings besides `database_url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    payment: PaymentSettings,
    /// Hours an `Idempotency-Key` replays its order; at least the contract's 24.
    #[serde(default = "default_key_hours")]
    idempotency_key_hours: u64,
}

fn default_key_hours() -> u64 {
    48
}

/// The shortest time a key is kept: the contract's.
const MIN_KEY_HOURS: u64 = 24;
/// How often expired keys are looked for.
const EXPIRE_KEYS_EVERY: Duration = Duration::from_secs(600);

fn build(ctx: ModuleContext) -> anyhow::Result<Box<dyn Module>> {
    let settings: Settings = ctx.settings(MODULE)?;
    anyhow::ensure!(
        settings.idempotency_key_hours >= MIN_KEY_HOURS,
        "modules.checkout.idempotency_key_hours must be at least {MIN_KEY_HOURS}"
    );
    let test_gateway = Arc::new(payment::TestGateway::new(ctx.db.clone(), &settings.payment));
    let gateway: Arc<dyn PaymentGateway> = Arc::new(payment::GuardedGateway::new(
        test_gateway,
        &settings.payment,
    ));
    let lease = payment::lease_for(&settings.payment);
    let retry = payment::RetryDelays::new(&settings.payment);
    let (payments, handed) = payment::Handoff::new(lease);
    Ok(Box::new(Checkout {
        db: ctx.db,
        gateway,
        lease,
        retry,
        payments,
        handed: Mutex::new(Some(handed)),
        key_retention: Duration::from_secs(settings.idempotency_key_hours * 3600),
    }))
}

struct Checkout {
    db: Db,
    gateway: Arc<dyn PaymentGateway>,
    lease: chrono::Duration,
    retry: payment::RetryDelays,
    /// Payment steps this process's consumers claim, for its payment worker.
    payments: payment::Handoff,
    handed: Mutex<Option<mpsc::UnboundedReceiver<store::OrderRow>>>,
    /// How long an idempotency key is kept.
    key_retention: Duration,
}

#[derive(OpenApi)]
#[openapi(paths(
    http::place_order,
    http::list_orders,
    http::get_order,
    http::cancel_order
))]
struct CheckoutApi;

impl Module for Checkout {
    fn name(&self) -> &'static str {
        MODULE
    }

    fn routes(&self, cfg: &mut web::ServiceConfig, ports: &Ports) {
        let deps = http::Deps {
            cart: ports.get::<dyn CartQueries>(),
            gateway: self.gateway.clone(),
        };
        http::routes(cfg, self.db.clone(), deps);
    }

    fn consumers(&self) -> Vec<Consumer> {
        vec![
            Consumer {
                name: MODULE,
                source: "catalog",
                events: &[
                    contracts::catalog::StockReserved::NAME,
                    contracts::catalog::StockReservationRejected::NAME,
                ],
                // The reservation's outcome leads to the charge and the answer.
                prompt: true,
                handler: Arc::new(handlers::CatalogEvents {
                    payments: self.payments.clone(),
                }),
            },
            Consumer {
                name: MODULE,
                source: "delivery",
                events: contracts::delivery::EVENT_NAMES,
                prompt: false,
                handler: Arc::new(handlers::DeliveryEvents {
                    payments: self.payments.clone(),
                }),
            },
        ]
    }

    fn tasks(
        &self,
        _ports: &Ports,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<BoxFuture<'static, ()>> {
        // Started once per process; without its receiver (a second call) the
        // steps handed over are found by the worker's looks once their claims run out.
        let handed = self
            .handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| mpsc::unbounded_channel().1);
        vec![
            Box::pin(payment::run_worker(
                self.db.clone(),
                self.gateway.clone(),
                self.lease,
                self.retry,
                handed,
                shutdown.clone(),
            )),
            Box::pin(expire_keys(self.db.clone(), self.key_retention, shutdown)),
        ]
    }

    fn openapi(&self) -> utoipa::openapi::OpenApi {
        CheckoutApi::openapi()
    }
}

/// Deletes idempotency keys older than `retention` every `EXPIRE_KEYS_EVERY` until
/// `shutdown`.
async fn expire_keys(db: Db, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        tokio::select! {
            () = tokio::time::sleep(EXPIRE_KEYS_EVERY) => {}
            _ = shutdown.changed() => break,
        }
        match expire_idempotency_keys(&db, retention).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(module = MODULE, expired, "idempotency keys expired"),
            Err(e) => {
                tracing::warn!(module = MODULE, error = %e, "expiring idempotency keys failed")
            }
        }
    }
}

/// Deletes the idempotency keys of checkout's `db` stored longer than `retention`
/// ago, a chunk per transaction; returns how many went. Such a key no longer
/// replays its order: the same key places a new one.
pub async fn expire_idempotency_keys(
    db: &Db,
    retention: Duration,
) -> Result<usize, kernel::db::DbError> {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let Some(before) = kernel::time::now().checked_sub_signed(retention) else {
        return Ok(0);
    };
    kernel::bus::retention::in_chunks(
        db,
        kernel::bus::retention::earliest(),
        move |conn, from, max| store::prune_keys(conn, from, before, max),
    )
    .await
}
