//! Pruning what the event machinery no longer needs, so that a module's outbox and
//! inbox stop growing with its age.
//!
//! - An outbox row goes once every reader of the outbox has passed it (the local
//!   consumers of the module, or the relay of a publishing transport) and it is
//!   older than the retention. The newest row always stays: SQLite numbers the next
//!   event from it, and `outbox::last_sequence` reads it.
//! - An inbox record goes once its event is older than the retention. The record
//!   only guards against the same event coming again; with the local transport a
//!   consumer's position is past it long before, and JetStream redelivers an
//!   unacknowledged message within its ack wait.
//!
//! Both are deleted in bounded chunks, each its own short transaction, so pruning a
//! large backlog never holds locks for long. Retries, dead letters, positions and
//! leases are never pruned: they are live state or an operator's to settle.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::db::{AnyConnection, Db, DbError, write_tx};
use crate::schema::{colony_consumer_positions as positions, colony_inbox, colony_outbox};

/// Rows deleted per statement.
pub const CHUNK: i64 = 1000;

/// Who reads a module's outbox, and so decides how far it may be pruned.
#[derive(Clone)]
pub enum Readers {
    /// A publishing transport's relay, at its position in the module's database.
    Relay,
    /// Local consumers, each at its position in its own database: `(consumer, db)`.
    Consumers(Vec<(&'static str, Db)>),
    /// Someone this process cannot see (a consumer of the module that runs
    /// elsewhere, over the local transport): the outbox is kept whole.
    Unknown,
}

/// What one pruning round deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub outbox: usize,
    pub inbox: usize,
}

/// The stored position of `consumer` on `source` in the consumer's database (0
/// when it has never stored one).
pub fn stored_position(conn: &mut AnyConnection, consumer: &str, source: &str) -> QueryResult<i64> {
    Ok(positions::table
        .find((consumer, source))
        .select(positions::position)
        .get_result::<i64>(conn)
        .optional()?
        .unwrap_or(0))
}

/// Deletes, of the `max` oldest outbox rows numbered through `through`, those that
/// occurred before `before`, never the newest row. Returns how many went: fewer
/// than `max` when a younger row was among them or none are left.
pub fn prune_outbox(
    conn: &mut AnyConnection,
    through: i64,
    before: NaiveDateTime,
    max: i64,
) -> QueryResult<usize> {
    write_tx(conn, |conn| {
        // Inside the transaction: on SQLite writers are serialised, so the newest
        // row stays the newest until the commit.
        let newest = crate::outbox::last_sequence(conn)?;
        let through = through.min(newest - 1);
        // The chunk is the `max` oldest rows, of which those older than `before`
        // go: numbers follow publication, so those are nearly all of them, and the
        // statement reads no more than `max` rows however long the outbox.
        let last: Option<i64> = colony_outbox::table
            .filter(colony_outbox::sequence.le(through))
            .order(colony_outbox::sequence.asc())
            .offset(max - 1)
            .select(colony_outbox::sequence)
            .first(conn)
            .optional()?;
        diesel::delete(
            colony_outbox::table
                .filter(colony_outbox::sequence.le(last.unwrap_or(through)))
                .filter(colony_outbox::occurred_at.lt(before)),
        )
        .execute(conn)
    })
}

/// Deletes up to `max` of `consumer`'s inbox records of events that occurred before
/// `before`. Event ids are UUIDv7, so their text sorts by the time they were made
/// and the primary key finds them. Returns how many went.
pub fn prune_inbox(
    conn: &mut AnyConnection,
    consumer: &str,
    before: NaiveDateTime,
    max: i64,
) -> QueryResult<usize> {
    let floor = event_id_floor(before);
    let mine = colony_inbox::table.filter(colony_inbox::consumer.eq(consumer));
    // The chunk ends at the `max`-th record that may go (ids sort by age).
    let last: Option<String> = mine
        .filter(colony_inbox::event_id.lt(&floor))
        .order(colony_inbox::event_id.asc())
        .offset(max - 1)
        .select(colony_inbox::event_id)
        .first(conn)
        .optional()?;
    let upto = colony_inbox::event_id.le(last.unwrap_or_else(|| floor.clone()));
    diesel::delete(mine.filter(upto).filter(colony_inbox::event_id.lt(&floor))).execute(conn)
}

/// The smallest UUIDv7 of the millisecond `before`, as stored: every event id made
/// earlier sorts below it, every one made at or after it does not.
pub fn event_id_floor(before: NaiveDateTime) -> String {
    let millis = u64::try_from(before.and_utc().timestamp_millis()).unwrap_or(0);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70;
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// How far every reader of `db`'s outbox has read; `None` when one of them cannot
/// be asked.
pub async fn read_by_all(db: &Db, readers: &Readers) -> Result<Option<i64>, DbError> {
    let source = db.module();
    match readers {
        Readers::Unknown => Ok(None),
        Readers::Relay => db
            .read(move |conn| crate::outbox::relay_position(conn, source).map_err(DbError::from))
            .await
            .map(Some),
        Readers::Consumers(consumers) => {
            // No consumer at all: every row has been read by everyone.
            let mut floor = i64::MAX;
            for (consumer, consumer_db) in consumers {
                let consumer = *consumer;
                let position = consumer_db
                    .read(move |conn| {
                        stored_position(conn, consumer, source).map_err(DbError::from)
                    })
                    .await?;
                floor = floor.min(position);
            }
            Ok(Some(floor))
        }
    }
}

/// One round: prunes `db`'s outbox as far as `readers` allow and the inbox records
/// of `consumers`, of everything that occurred before `before`, chunk by chunk
/// until nothing older is left.
pub async fn prune(
    db: &Db,
    readers: &Readers,
    consumers: &[&'static str],
    before: NaiveDateTime,
) -> Result<Pruned, DbError> {
    let mut pruned = Pruned::default();
    if let Some(through) = read_by_all(db, readers).await? {
        pruned.outbox = in_chunks(db, move |conn, max| {
            prune_outbox(conn, through, before, max)
        })
        .await?;
    }
    for consumer in consumers {
        let consumer = *consumer;
        pruned.inbox += in_chunks(db, move |conn, max| {
            prune_inbox(conn, consumer, before, max)
        })
        .await?;
    }
    Ok(pruned)
}

/// Runs `delete` (which deletes up to its `max` rows) in `CHUNK`s, each its own
/// write, until one comes back short; returns how many rows went in all.
pub async fn in_chunks<F>(db: &Db, delete: F) -> Result<usize, DbError>
where
    F: Fn(&mut AnyConnection, i64) -> QueryResult<usize> + Clone + Send + 'static,
{
    let mut total = 0;
    loop {
        let delete = delete.clone();
        let n = db
            .write_one(move |conn| delete(conn, CHUNK).map_err(DbError::from))
            .await?;
        total += n;
        if i64::try_from(n).unwrap_or(i64::MAX) < CHUNK {
            return Ok(total);
        }
    }
}

/// Prunes `db` every `every` until `shutdown`, keeping what occurred within
/// `retention` (the first round a little after the start, so that it never adds
/// to the work of starting).
pub async fn run(
    db: Db,
    readers: Readers,
    consumers: Vec<&'static str>,
    retention: std::time::Duration,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut wait = every.min(std::time::Duration::from_secs(30));
    while !*shutdown.borrow() {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
        wait = every;
        let before = crate::time::now()
            .checked_sub_signed(retention)
            .unwrap_or(NaiveDateTime::MIN);
        match prune(&db, &readers, &consumers, before).await {
            Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                module = db.module(),
                outbox = pruned.outbox,
                inbox = pruned.inbox,
                "pruned events older than the retention"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(module = db.module(), error = %e, "pruning events failed"),
        }
    }
}
