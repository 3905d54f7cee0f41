#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic to fail the test"
)]

//! Black-box tests of the whole application over HTTP: each test spawns colony on
//! port 0 with its own databases (a temp SQLite directory, or a fresh PostgreSQL
//! database when `COLONY_TEST_DATABASE_URL` is set).

mod helpers;

use kernel::on_both_backends;

mod cart;
mod catalog;
mod crash;
mod errors;
mod nats;
mod notify;
mod ops;
mod retention;
mod split;
pub mod story;
mod topology;
