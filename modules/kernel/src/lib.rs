//! The shared kernel of colony: database access, the event bus with its outbox and
//! inbox, the module contract, authentication, errors and metrics. It holds no
//! business rules and names no business module.

pub mod auth;
pub mod benchkit;
pub mod bus;
pub mod context;
pub mod db;
pub mod envelope;
pub mod error;
pub mod lookup;
pub mod metrics;
pub mod migrate;
pub mod module;
pub mod openapi;
pub mod outbox;
pub mod resilience;
pub mod schema;
pub mod testing;
pub mod time;
pub mod trace;

pub use db::{AnyConnection, Db};
pub use envelope::Envelope;
pub use error::Problem;
