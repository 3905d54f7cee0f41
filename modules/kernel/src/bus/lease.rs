//! One holder per consumer when replicas share a transport's subscription (NATS).
//!
//! JetStream hands a shared durable consumer's messages to whichever replica asks,
//! so two replicas could each hold events of the same key and handle them out of
//! order. The lease makes one replica at a time the consumer's holder: it pulls and
//! handles, the others wait. The lease is a row in the consumer's database, renewed
//! inside each pass's transaction: its row lock keeps a competitor out until that
//! pass commits, and a pass that finds the lease lost handles nothing.
//!
//! A holder that dies leaves messages delivered but not acknowledged; the server
//! delivers them again, ahead of newer ones, once their ack wait ends. The lease
//! outlives the ack wait, so the next holder starts with them and key order holds
//! across the failover.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::schema::colony_consumer_leases as leases;

/// Takes or renews the lease of `consumer` on `source` for `holder` until `until`;
/// `false` while another holder's lease runs. Call inside the pass's transaction.
pub fn hold(
    conn: &mut AnyConnection,
    consumer: &str,
    source: &str,
    holder: &str,
    now: NaiveDateTime,
    until: NaiveDateTime,
) -> QueryResult<bool> {
    let renewed = diesel::update(leases::table.find((consumer, source)))
        .filter(leases::holder.eq(holder).or(leases::expires_at.lt(now)))
        .set((leases::holder.eq(holder), leases::expires_at.eq(until)))
        .execute(conn)?;
    if renewed > 0 {
        return Ok(true);
    }
    let row = (
        leases::consumer.eq(consumer),
        leases::source.eq(source),
        leases::holder.eq(holder),
        leases::expires_at.eq(until),
    );
    // A first holder: whoever inserts the row; a concurrent insert waits for the
    // winner's commit and then does nothing.
    let inserted = match conn {
        AnyConnection::Sqlite(c) => diesel::insert_into(leases::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(c)?,
        AnyConnection::Postgresql(c) => diesel::insert_into(leases::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(c)?,
    };
    Ok(inserted > 0)
}

/// The current holder of a consumer's lease and until when, if any.
pub fn holder(
    conn: &mut AnyConnection,
    consumer: &str,
    source: &str,
) -> QueryResult<Option<(String, NaiveDateTime)>> {
    leases::table
        .find((consumer, source))
        .select((leases::holder, leases::expires_at))
        .get_result(conn)
        .optional()
}
