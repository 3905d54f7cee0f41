//! Pruning what the event machinery no longer needs, so that a module's outbox and
//! inbox stop growing with its age.
//!
//! - An outbox row goes once every reader of the outbox has passed it (the local
//!   consumers of the module, or the relay of a publishing transport) and it is
//!   older than the retention. The newest row always stays: SQLite numbers the next
//!   event from it, and `outbox::last_sequence` reads it.
//! - An inbox record goes once it was handled longer ago than the retention. The
//!   record only guards against the same event coming again: with the local
//!   transport a consumer never reads behind its position, and JetStream delivers
//!   an event again only while it is unacknowledged, which after a commit means an
//!   acknowledgement lost with its process and redelivered once a replica pulls.
//!
//! Both are deleted in bounded chunks, each its own short transaction, so pruning a
//! large backlog never holds locks for long. Retries, dead letters, positions and
//! leases are never pruned: they are live state or an operator's to settle.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::db::{AnyConnection, Db, DbError, write_tx};
use crate::schema::{colony_consumer_positions as positions, colony_inbox, colony_outbox};

/// Before any timestamp either backend holds (PostgreSQL refuses chrono's own
/// minimum): where chunks keyed by time start.
pub fn earliest() -> NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default()
}

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

/// One chunk of outbox rows: of the `max` oldest rows numbered from `from` through
/// `through`, those that occurred before `before` go, never the newest row. Returns
/// how many went and where the next chunk starts (`None`: nothing is left).
pub fn prune_outbox(
    conn: &mut AnyConnection,
    from: i64,
    through: i64,
    before: NaiveDateTime,
    max: i64,
) -> QueryResult<(usize, Option<i64>)> {
    write_tx(conn, |conn| {
        // Inside the transaction: on SQLite writers are serialised, so the newest
        // row stays the newest until the commit.
        let newest = crate::outbox::last_sequence(conn)?;
        let through = through.min(newest - 1);
        // Numbers follow publication, so the oldest rows are nearly all older than
        // `before` when any are; the statement reads no more than `max` of them
        // however long the outbox, and the next chunk starts after them.
        let last: Option<i64> = colony_outbox::table
            .filter(colony_outbox::sequence.ge(from))
            .filter(colony_outbox::sequence.le(through))
            .order(colony_outbox::sequence.asc())
            .offset(max - 1)
            .select(colony_outbox::sequence)
            .first(conn)
            .optional()?;
        let deleted = diesel::delete(
            colony_outbox::table
                .filter(colony_outbox::sequence.ge(from))
                .filter(colony_outbox::sequence.le(last.unwrap_or(through)))
                .filter(colony_outbox::occurred_at.lt(before)),
        )
        .execute(conn)?;
        Ok((deleted, last.map(|last| last + 1)))
    })
}

/// One chunk of `consumer`'s inbox records: up to `max` of those handled before
/// `before`, oldest first, from `from` on. Returns how many went and where the
/// next chunk starts (`None`: nothing is left).
///
/// A record goes by when its event was handled, not when it was made: a consumer
/// catching up on old events keeps their records the whole retention.
pub fn prune_inbox(
    conn: &mut AnyConnection,
    consumer: &str,
    from: NaiveDateTime,
    before: NaiveDateTime,
    max: i64,
) -> QueryResult<(usize, Option<NaiveDateTime>)> {
    let old = colony_inbox::table
        .filter(colony_inbox::consumer.eq(consumer))
        .filter(colony_inbox::handled_at.ge(from))
        .filter(colony_inbox::handled_at.lt(before));
    let last: Option<NaiveDateTime> = old
        .order(colony_inbox::handled_at.asc())
        .offset(max - 1)
        .select(colony_inbox::handled_at)
        .first(conn)
        .optional()?;
    let deleted = diesel::delete(old.filter(colony_inbox::handled_at.le(last.unwrap_or(before))))
        .execute(conn)?;
    // Records handled in the same instant as `last` went with it.
    Ok((deleted, last))
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

/// One round: prunes `db`'s outbox as far as `readers` allow, of rows that
/// occurred before `before`, and the inbox records of `consumers` handled before
/// it, chunk by chunk until nothing older is left.
pub async fn prune(
    db: &Db,
    readers: &Readers,
    consumers: &[&'static str],
    before: NaiveDateTime,
) -> Result<Pruned, DbError> {
    let mut pruned = Pruned::default();
    if let Some(through) = read_by_all(db, readers).await? {
        pruned.outbox = in_chunks(db, 0, move |conn, from, max| {
            prune_outbox(conn, from, through, before, max)
        })
        .await?;
    }
    for consumer in consumers {
        let consumer = *consumer;
        pruned.inbox += in_chunks(db, earliest(), move |conn, from, max| {
            prune_inbox(conn, consumer, from, before, max)
        })
        .await?;
    }
    Ok(pruned)
}

/// Runs `delete` chunk by chunk, each its own write, from key `start`:
/// `delete(conn, from, max)` deletes up to `max` rows from `from` on and says where
/// the next chunk starts. Stops when a chunk comes back short or nothing is left;
/// returns how many rows went in all. (Each chunk starts where the last ended, so
/// that no statement walks again over what the earlier ones deleted.)
pub async fn in_chunks<K, F>(db: &Db, start: K, delete: F) -> Result<usize, DbError>
where
    K: Send + 'static,
    F: Fn(&mut AnyConnection, K, i64) -> QueryResult<(usize, Option<K>)> + Clone + Send + 'static,
{
    let mut total = 0;
    let mut from = start;
    loop {
        let delete = delete.clone();
        let (n, next) = db
            .write_one(move |conn| delete(conn, from, CHUNK).map_err(DbError::from))
            .await?;
        total += n;
        match next {
            Some(next) if i64::try_from(n).unwrap_or(i64::MAX) >= CHUNK => from = next,
            _ => return Ok(total),
        }
    }
}

/// Prunes `db` every `every` until `shutdown`, keeping what is younger than
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
            .unwrap_or_else(earliest);
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
