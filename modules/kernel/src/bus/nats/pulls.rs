//! The pull requests a NATS subscription keeps open while it holds its
//! consumer's lease, and the inbox they deliver to.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::{FutureExt, StreamExt};

use super::{NO_ANSWER, answered, transport_error};
use crate::bus::BusError;

/// Messages a pull request asks for, unless the consumer allows fewer.
const PULL_BATCH: usize = 128;

/// What pull requests ask for.
#[derive(Clone, Copy)]
pub(super) struct Request {
    batch: usize,
    /// How long a request stays open at the server: an eighth of the ack wait.
    /// Requests are sent only while the lease was renewed within a quarter of its
    /// length (`NatsSubscription::may_request`), over a connection that is up; what
    /// they deliver and this process leaves unacknowledged is then due for
    /// redelivery, ahead of newer events, before the lease can pass to another
    /// replica: ttl/4 + expiry + ack wait <= ttl, with ttl = 1.5 ack wait + 0.5 s.
    pub(super) expiry: Duration,
}

impl Request {
    pub(super) fn for_ack_wait(ack_wait: Duration) -> Self {
        Self {
            batch: PULL_BATCH,
            expiry: (ack_wait / 8).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }

    /// Within the limits of a consumer made elsewhere, which refuses larger
    /// requests.
    pub(super) fn for_consumer(config: &jetstream::consumer::Config) -> Self {
        let mut request = Self::for_ack_wait(config.ack_wait);
        if let Ok(max) = usize::try_from(config.max_batch)
            && max > 0
        {
            request.batch = request.batch.min(max);
        }
        if !config.max_expires.is_zero() {
            request.expiry = request.expiry.min(config.max_expires);
        }
        request
    }
}

/// Past its expiry, how long a request's end may take to be reported before it
/// counts as ended anyway (an answer lost with a dropped connection).
pub(super) const PULL_GRACE: Duration = Duration::from_millis(100);

/// The pull requests of one subscription and the inbox their messages come to.
/// The inbox stays subscribed while requests may deliver to it
/// (`NatsSubscription::retire_pulls`), so whatever a request delivers is
/// received, whether or not it is still counted as open.
pub(super) struct Pulls {
    /// Acknowledges the messages.
    context: jetstream::Context,
    inbox: async_nats::Subject,
    delivered: async_nats::Subscriber,
    /// Requests counted as open, oldest first.
    open: VecDeque<PullRequest>,
    /// What the last message said was ready for the consumer behind it.
    behind: u64,
    /// The subscription ended.
    ended: bool,
}

/// A pull request counted as open.
struct PullRequest {
    /// When the next request is sent if this is the last one.
    followed_at: Instant,
    /// When the server ends it.
    ends: Instant,
    /// The messages it may still bring.
    left: usize,
}

impl Pulls {
    pub(super) async fn new(context: &jetstream::Context) -> Result<Self, BusError> {
        let client = context.client();
        let inbox = async_nats::Subject::from(client.new_inbox());
        let delivered = client
            .subscribe(inbox.clone())
            .await
            .map_err(transport_error)?;
        Ok(Self {
            context: context.clone(),
            inbox,
            delivered,
            open: VecDeque::new(),
            behind: 0,
            ended: false,
        })
    }

    /// What the open requests may still bring.
    fn owed(&self) -> usize {
        self.open.iter().map(|request| request.left).sum()
    }

    /// Whether the last message said more were ready, and an open request may
    /// bring them.
    pub(super) fn more_coming(&self) -> bool {
        self.behind > 0 && self.owed() > 0
    }

    /// Whether the inbox's subscription ended (a new one is needed).
    pub(super) fn ended(&self) -> bool {
        self.ended
    }

    /// Counts no request as open any more: the next wait sends one.
    pub(super) fn forget(&mut self) {
        self.open.clear();
    }

    /// When the next request may be due: the last one sent is about to end, or
    /// the oldest counts as ended though nothing said so.
    fn next_check(&self) -> Option<Instant> {
        let oldest = self.open.front()?;
        let newest = self.open.back()?;
        Some(newest.followed_at.min(oldest.ends + PULL_GRACE))
    }

    /// Sends a request when the open ones may bring less than half a batch, or
    /// the last one sent is about to end.
    pub(super) async fn keep_open(
        &mut self,
        consumer: &PullConsumer,
        request: Request,
    ) -> Result<(), BusError> {
        let now = Instant::now();
        self.open
            .retain(|request| request.left > 0 && request.ends + PULL_GRACE > now);
        let ending = self
            .open
            .back()
            .is_none_or(|request| request.followed_at <= now);
        if self.owed() > request.batch / 2 && !ending {
            return Ok(());
        }
        let Request { batch, expiry } = request;
        let request = jetstream::consumer::pull::BatchConfig {
            batch,
            expires: Some(expiry),
            ..Default::default()
        };
        answered("a pull request", NO_ANSWER, async {
            consumer
                .request_batch(request, self.inbox.clone())
                .await
                .map_err(transport_error)
        })
        .await?;
        self.open.push_back(PullRequest {
            // The next one goes out before this one ends: the server does not
            // always report an end at once, and an event published in between
            // would wait for the next request.
            followed_at: now + expiry * 3 / 4,
            ends: now + expiry,
            left: batch,
        });
        Ok(())
    }

    /// The next message, waiting until `until` at most. `None`: none came, or the
    /// server said a request ended (the caller may want to send another).
    pub(super) async fn next(
        &mut self,
        until: Instant,
    ) -> Result<Option<jetstream::Message>, BusError> {
        let until = self.next_check().map_or(until, |check| check.min(until));
        let Ok(message) = tokio::time::timeout_at(until.into(), self.delivered.next()).await else {
            return Ok(None);
        };
        let Some(message) = message else {
            return Err(self.closed());
        };
        self.accept(message)
    }

    /// A message already received, if any, without waiting.
    pub(super) fn ready(&mut self) -> Result<Option<jetstream::Message>, BusError> {
        while let Some(message) = self.delivered.next().now_or_never() {
            let Some(message) = message else {
                return Err(self.closed());
            };
            if let Some(message) = self.accept(message)? {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// The inbox's subscription ended (the client closed): a new one is needed.
    fn closed(&mut self) -> BusError {
        self.ended = true;
        BusError::Transport("the pull inbox was closed".into())
    }

    /// An event's message, counted against the oldest request still owing; a
    /// status that ends a request ends the oldest. (The server may spread
    /// messages over the open requests in turn, so the count per request is an
    /// estimate: at worst a request is sent early, or one ending unreported is
    /// followed on time anyway, as every request is; see `PullRequest`.)
    fn accept(
        &mut self,
        message: async_nats::Message,
    ) -> Result<Option<jetstream::Message>, BusError> {
        use async_nats::StatusCode;
        match message.status {
            None | Some(StatusCode::OK) => {
                if let Some(request) = self.open.iter_mut().find(|request| request.left > 0) {
                    request.left -= 1;
                }
                let message = jetstream::Message {
                    context: self.context.clone(),
                    message,
                };
                self.behind = message.info().map_or(0, |info| info.pending);
                Ok(Some(message))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                self.open.pop_front();
                Ok(None)
            }
            Some(StatusCode::REQUEST_TERMINATED)
                if message.description.as_deref().is_some_and(|d| {
                    d.eq_ignore_ascii_case("Leadership Change")
                        || d.eq_ignore_ascii_case("Server Shutdown")
                }) =>
            {
                // The request ended with its server's role; the next one goes
                // to whichever server leads the consumer now.
                self.open.pop_front();
                Ok(None)
            }
            Some(status) => {
                // 409: the consumer was deleted, or a limit of its refused the
                // request; 503: no JetStream. Asking again at once would be
                // refused again: the caller backs off.
                self.open.pop_front();
                let description = message.description.unwrap_or_default();
                Err(BusError::Transport(format!(
                    "pull request ended: {status} {description}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::nats::lease_ttl;

    /// What a request delivers and is left unacknowledged is due again before the
    /// lease it was sent under can pass to another replica, whatever the ack wait.
    #[test]
    fn requests_end_in_time_for_a_redelivery_before_the_lease_passes_on() {
        for ms in (100..=120_000).step_by(50) {
            let ack_wait = Duration::from_millis(ms);
            let ttl = lease_ttl(ack_wait);
            let request = Request::for_ack_wait(ack_wait);
            assert!(
                ttl / 4 + request.expiry + ack_wait <= ttl,
                "ack wait {ack_wait:?}: requests may deliver too late"
            );
        }
    }

    #[test]
    fn requests_stay_within_the_consumers_limits() {
        let mut config = jetstream::consumer::Config {
            ack_wait: Duration::from_secs(5),
            ..Default::default()
        };
        let request = Request::for_consumer(&config);
        assert_eq!(request.batch, PULL_BATCH);
        assert_eq!(request.expiry, Duration::from_millis(625));
        config.max_batch = 10;
        config.max_expires = Duration::from_millis(200);
        let request = Request::for_consumer(&config);
        assert_eq!(request.batch, 10);
        assert_eq!(request.expiry, Duration::from_millis(200));
    }
}
