//! The envelope every event travels in, whatever the transport.

use chrono::{DateTime, Utc};
use contracts::Event;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::trace::TraceContext;

/// An event with the metadata that routes, orders, deduplicates and traces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7, unique per event; consumers deduplicate on it.
    pub event_id: Uuid,
    /// Stable name, `<module>.<event>.v<N>`.
    pub name: String,
    /// The publishing module.
    pub source: String,
    /// The aggregate the event is about; events of one aggregate arrive in order.
    pub aggregate_id: String,
    /// Position in the source's outbox, gapless and in commit order.
    pub sequence: i64,
    pub occurred_at: DateTime<Utc>,
    /// The request or process this event belongs to.
    pub correlation_id: Uuid,
    /// The event that caused this one, if any.
    pub causation_id: Option<Uuid>,
    /// W3C trace context of the span that published the event.
    pub traceparent: Option<String>,
    pub payload: serde_json::Value,
}

impl Envelope {
    /// The payload as `E` when this envelope carries an `E`; `None` for other events.
    pub fn decode<E: Event>(&self) -> Option<Result<E, serde_json::Error>> {
        (self.name == E::NAME).then(|| serde_json::from_value(self.payload.clone()))
    }

    pub fn trace(&self) -> Option<TraceContext> {
        self.traceparent.as_deref().and_then(TraceContext::parse)
    }
}
