//! The published language of colony: every event a module publishes and every query
//! port a module offers, versioned. Other modules depend on this crate, never on the
//! publishing module itself. No database or HTTP types live here.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod cart;
pub mod catalog;
pub mod checkout;
pub mod delivery;
pub mod money;

pub use money::Money;

/// An event of the published language.
///
/// `NAME` is the stable wire name, `<module>.<event>.v<N>`, independent of the Rust
/// type path. A change that would break a consumer is a new type with a new version.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    const NAME: &'static str;

    /// The module that publishes this event: the first segment of `NAME`.
    fn source() -> &'static str {
        Self::NAME.split('.').next().unwrap_or(Self::NAME)
    }
}

/// Every event name of every module, for tooling (`colony arch`) and contract tests.
pub fn all_event_names() -> Vec<&'static str> {
    [
        catalog::EVENT_NAMES,
        checkout::EVENT_NAMES,
        delivery::EVENT_NAMES,
    ]
    .concat()
}
