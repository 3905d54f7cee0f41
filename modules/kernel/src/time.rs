//! Timestamps at the precision both backends store.

use chrono::{DurationRound, NaiveDateTime, TimeDelta, Utc};

/// Now, in UTC, truncated to microseconds: PostgreSQL keeps no more, so a value
/// returned before storing equals the value read back after.
pub fn now() -> NaiveDateTime {
    let now = Utc::now();
    now.duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now)
        .naive_utc()
}
