//! An optional simulated carrier for demos: it dispatches shipments that have been
//! preparing for a while and delivers dispatched ones, as an operator would.

use std::time::Duration;

use kernel::Db;
use kernel::db::DbError;
use kernel::outbox::Publisher;
use serde::Deserialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::MODULE;
use crate::shipping::{self, Move};
use crate::store;

/// `modules.delivery.carrier` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarrierSettings {
    pub enabled: bool,
    /// How long a shipment prepares before the carrier takes it.
    pub dispatch_after_ms: u64,
    /// How long a dispatched shipment travels.
    pub deliver_after_ms: u64,
}

impl Default for CarrierSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            dispatch_after_ms: 5_000,
            deliver_after_ms: 10_000,
        }
    }
}

pub async fn run(db: Db, settings: CarrierSettings, mut shutdown: watch::Receiver<bool>) {
    let tick = Duration::from_millis(
        settings
            .dispatch_after_ms
            .min(settings.deliver_after_ms)
            .clamp(50, 1_000),
    );
    while !*shutdown.borrow() {
        for (status, after, step) in [
            ("preparing", settings.dispatch_after_ms, Move::Dispatch),
            ("dispatched", settings.deliver_after_ms, Move::Deliver),
        ] {
            if let Err(e) = move_idle(&db, status, after, step).await {
                tracing::warn!(error = %e, "simulated carrier failed a round");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn move_idle(
    db: &Db,
    status: &'static str,
    after_ms: u64,
    step: Move,
) -> Result<(), DbError> {
    let before = kernel::time::now()
        - chrono::Duration::milliseconds(i64::try_from(after_ms).unwrap_or(i64::MAX));
    let ids = db
        .read(move |conn| store::idle_since(conn, status, before).map_err(DbError::from))
        .await?;
    for id in ids {
        let publisher = Publisher::new(MODULE, Uuid::now_v7(), None);
        let moved = db
            .write(move |conn| shipping::advance(conn, &publisher, &id, step))
            .await;
        if let Err(e) = moved {
            // Someone moved it first (an operator): nothing to do.
            tracing::debug!(error = %e, "carrier skipped a shipment");
        }
    }
    Ok(())
}
