//! Figures about a module's event machinery, for metrics and the admin view.

use diesel::prelude::*;
use serde::Serialize;

use crate::db::AnyConnection;
use crate::outbox;
use crate::schema::{colony_consumer_positions as positions, colony_dead_letters, colony_deferred};

/// Where one consumer of this module stands on one source.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumerStats {
    pub consumer: String,
    pub source: String,
    pub position: i64,
    /// Events waiting for a retry, or queued behind one.
    pub retrying: i64,
}

/// The event machinery of one module's database.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BusStats {
    /// The newest sequence this module published.
    pub last_sequence: i64,
    /// Outbox rows a publishing transport has not yet relayed (0 for `local`,
    /// whose outbox is itself the log). The relay's own position is listed among
    /// the consumers as `_relay`.
    pub unrelayed: i64,
    pub consumers: Vec<ConsumerStats>,
    pub dead_letters: i64,
}

/// Reads the figures of the module behind `conn`, named `module`; `relaying` says
/// whether a transport relays its outbox.
pub fn read(conn: &mut AnyConnection, module: &str, relaying: bool) -> QueryResult<BusStats> {
    let last_sequence = outbox::last_sequence(conn)?;
    let unrelayed = if relaying {
        last_sequence - outbox::relay_position(conn, module)?
    } else {
        0
    };
    let rows: Vec<(String, String, i64)> = positions::table
        .select((positions::consumer, positions::source, positions::position))
        .order((positions::consumer, positions::source))
        .load(conn)?;
    let mut consumers = Vec::with_capacity(rows.len());
    for (consumer, source, position) in rows {
        let retrying = colony_deferred::table
            .filter(colony_deferred::consumer.eq(&consumer))
            .filter(colony_deferred::source.eq(&source))
            .count()
            .get_result(conn)?;
        consumers.push(ConsumerStats {
            consumer,
            source,
            position,
            retrying,
        });
    }
    let dead_letters = colony_dead_letters::table
        .filter(colony_dead_letters::replayed_at.is_null())
        .count()
        .get_result(conn)?;
    Ok(BusStats {
        last_sequence,
        unrelayed,
        consumers,
        dead_letters,
    })
}
