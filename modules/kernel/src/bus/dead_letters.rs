//! Dead letters: events a consumer gave up on, listed with their error and
//! replayed on request (the event goes back to the consumer's retry queue and is
//! handled once; the inbox still guards against a second effect).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::db::AnyConnection;
use crate::schema::{colony_dead_letters as dl, colony_deferred};

/// A parked event as operators see it.
#[derive(Debug, Clone, Serialize, Queryable, Selectable, utoipa::ToSchema)]
#[diesel(table_name = dl)]
pub struct DeadLetter {
    pub id: String,
    pub consumer: String,
    pub event_id: String,
    pub source: String,
    pub name: String,
    pub sequence: i64,
    pub aggregate_id: String,
    #[serde(skip)]
    pub envelope: String,
    pub error: String,
    pub attempts: i32,
    pub parked_at: NaiveDateTime,
    pub replayed_at: Option<NaiveDateTime>,
}

/// Parked events not yet replayed, oldest first.
pub fn list(conn: &mut AnyConnection) -> QueryResult<Vec<DeadLetter>> {
    dl::table
        .filter(dl::replayed_at.is_null())
        .order(dl::parked_at.asc())
        .select(DeadLetter::as_select())
        .load(conn)
}

/// How many parked events wait for an operator.
pub fn count_open(conn: &mut AnyConnection) -> QueryResult<i64> {
    dl::table
        .filter(dl::replayed_at.is_null())
        .count()
        .get_result(conn)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no dead letter {0}")]
    NotFound(String),
    #[error("dead letter {0} was already replayed")]
    AlreadyReplayed(String),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
}

/// Puts dead letter `id` back in its consumer's queue, due now, with a fresh
/// attempt count. Call inside a write transaction; then nudge the consumers.
pub fn replay(conn: &mut AnyConnection, id: &str) -> Result<DeadLetter, ReplayError> {
    let letter: DeadLetter = dl::table
        .find(id)
        .select(DeadLetter::as_select())
        .get_result(conn)
        .optional()?
        .ok_or_else(|| ReplayError::NotFound(id.to_string()))?;
    if letter.replayed_at.is_some() {
        return Err(ReplayError::AlreadyReplayed(id.to_string()));
    }
    let now = crate::time::now();
    diesel::insert_into(colony_deferred::table)
        .values((
            colony_deferred::consumer.eq(&letter.consumer),
            colony_deferred::event_id.eq(&letter.event_id),
            colony_deferred::source.eq(&letter.source),
            colony_deferred::sequence.eq(letter.sequence),
            colony_deferred::aggregate_id.eq(&letter.aggregate_id),
            colony_deferred::envelope.eq(&letter.envelope),
            colony_deferred::attempts.eq(0),
            colony_deferred::next_attempt_at.eq(now),
            colony_deferred::last_error.eq(Some(format!("replayed after: {}", letter.error))),
        ))
        .execute(conn)?;
    diesel::update(dl::table.find(id))
        .set(dl::replayed_at.eq(Some(now)))
        .execute(conn)?;
    Ok(DeadLetter {
        replayed_at: Some(now),
        ..letter
    })
}
