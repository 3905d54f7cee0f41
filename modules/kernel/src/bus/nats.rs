//! The NATS JetStream transport: a stream per producing module (subjects
//! `colony.<module>.<event>`), a durable pull consumer per consuming module, the
//! event id as `Nats-Msg-Id` so the server drops duplicates. A relay per local
//! module publishes its outbox, many messages in flight, and marks rows relayed
//! only once their acks came back. Consumers acknowledge a batch only after their
//! transaction committed; after a rollback the same batch is handled again, in order.
//! Replicas of a module share its durable consumer; a lease in the consumer's
//! database lets one of them at a time pull and handle (`lease.rs`), so events of a
//! key are handled in order across replicas and across a replica's death.
//!
//! The holder keeps a pull request open at the server, on an inbox that stays
//! subscribed while requests may deliver to it: an event published while it
//! handles others is on its way before the pass ends (unless the pass outlasts the
//! request, up to a second), and no request is sent per pass. Requests are short
//! (`Request`) and sent only while the lease is fresh and the connection up, so
//! that nothing they deliver outlives the lease's hold on key order.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use tokio::sync::watch;

use super::{BoxFuture, BusError, Handled, Subscription, Transport, lease, record_handled};
use crate::db::{AnyConnection, Db, DbError};
use crate::envelope::Envelope;
use crate::outbox;

mod pulls;
use pulls::{PULL_GRACE, Pulls, Request};

/// Longest a delivered event stays unacknowledged before the server delivers it
/// again (a consumer process that died mid-batch), for consumers created here.
pub const ACK_WAIT: Duration = Duration::from_secs(5);
const RELAY_BATCH: i64 = 256;

pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    /// First subject token and stream name prefix: `colony` unless several
    /// installations (or tests) share one server.
    prefix: String,
    ack_wait: Duration,
    /// This process, as holder of consumer leases.
    holder: String,
}

/// How long a consumer lease lasts past its last renewal: longer than the ack wait
/// of the consumer, so a dead holder's unacknowledged events are due for
/// redelivery before anyone else may pull.
pub fn lease_ttl(ack_wait: Duration) -> Duration {
    ack_wait + ack_wait / 2 + Duration::from_millis(500)
}

fn transport_error(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

/// The stream of `source`'s events.
pub fn stream_name(prefix: &str, source: &str) -> String {
    format!(
        "{}_{}",
        prefix.to_ascii_uppercase(),
        source.to_ascii_uppercase()
    )
}

/// The subject of an event: `<prefix>.<module>.<event>.v<N>`.
pub fn subject(prefix: &str, envelope: &Envelope) -> String {
    format!("{prefix}.{}", envelope.name)
}

impl NatsTransport {
    /// Connects to `url`; the client reconnects by itself after a drop. `prefix`
    /// names the subjects and streams (`colony` by default).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(transport_error)?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            prefix: prefix.to_string(),
            ack_wait: ACK_WAIT,
            holder: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple()),
        })
    }

    /// Sets the ack wait of consumers this transport creates (tests shorten it, and
    /// with it the failover time). A consumer that exists keeps its own; leases
    /// follow the consumer's actual setting.
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Creates the stream of `source` if missing (idempotent; every process that
    /// publishes or reads it may call this).
    pub async fn ensure_stream(&self, source: &str) -> Result<(), BusError> {
        ensure_stream(&self.js, &self.prefix, source)
            .await
            .map(|_| ())
    }

    /// Deletes the stream of `source` with everything in it (test teardown).
    pub async fn delete_stream(&self, source: &str) -> Result<(), BusError> {
        self.js
            .delete_stream(stream_name(&self.prefix, source))
            .await
            .map(|_| ())
            .map_err(transport_error)
    }

    /// Publishes `db`'s outbox until `shutdown`: woken by its commits, polling as a
    /// fallback. Up to 256 messages are in flight; the relay position, moved only past
    /// messages the server acknowledged, is written by a task of its own so the next
    /// read and publish never wait for it. After a failure the relay starts again at
    /// the written position (the server drops the duplicates).
    ///
    /// The commits of this process hand their envelopes over (`Db::relay_handoff`):
    /// those that follow on from the last one published go out without a read of
    /// the outbox. Anything else — a number not yet seen before them, a commit that
    /// handed nothing over, a poll — makes the relay read.
    pub async fn relay(&self, db: Db, poll: Duration, mut shutdown: watch::Receiver<bool>) {
        let source = db.module();
        let (acked, acked_seen) = watch::channel(None::<i64>);
        let keeper = tokio::spawn(keep_position(db.clone(), acked_seen));
        let mut commits = db.publications();
        let mut handed = db.relay_handoff();
        let mut unhanded_seen = db.unhanded();
        let mut cursor = None;
        let mut gaps = outbox::Gaps::default();
        let mut read = true;
        let mut wait = poll;
        while !*shutdown.borrow() {
            if read {
                wait = match self.relay_round(&db, &mut cursor, &mut gaps, &acked).await {
                    Ok(n) if n >= usize::try_from(RELAY_BATCH).unwrap_or(usize::MAX) => continue,
                    // Stopped at a gap: see `LocalSubscription::wait`.
                    Ok(_) if gaps.waiting() => super::local::GAP_RECHECK.min(poll),
                    Ok(_) => poll,
                    Err(e) => {
                        tracing::warn!(module = source, error = %e, "outbox relay failed; retrying");
                        cursor = None;
                        Duration::from_millis(500).min(poll)
                    }
                };
                read = false;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {}
                Some(envelopes) = handed.recv() => {
                    match self.relay_handed(envelopes, &mut cursor, &acked).await {
                        Ok(true) => {}
                        Ok(false) => read = true,
                        Err(e) => {
                            tracing::warn!(module = source, error = %e, "outbox relay failed; retrying");
                            cursor = None;
                            read = true;
                        }
                    }
                }
                _ = commits.changed() => {
                    // Handed-over envelopes come first (`biased`): a commit that
                    // handed over is already dealt with.
                    let unhanded = db.unhanded();
                    if unhanded != unhanded_seen || cursor.is_none() || gaps.waiting() {
                        unhanded_seen = unhanded;
                        read = true;
                    }
                }
                () = tokio::time::sleep(wait) => read = true,
            }
        }
        drop(acked);
        let _ = keeper.await;
    }

    /// Publishes the envelopes a commit handed over, in sequence order, as long as
    /// each follows on from `cursor`; then waits for their acknowledgements.
    /// `false`: some did not follow on, and a read must find what lies between.
    async fn relay_handed(
        &self,
        mut envelopes: Vec<Envelope>,
        cursor: &mut Option<i64>,
        acked: &watch::Sender<Option<i64>>,
    ) -> Result<bool, BusError> {
        let Some(mut at) = *cursor else {
            return Ok(false);
        };
        envelopes.sort_by_key(|e| e.sequence);
        let mut window = VecDeque::new();
        let mut followed_on = true;
        for envelope in envelopes {
            if envelope.sequence <= at {
                // Published already, by a read.
                continue;
            }
            if envelope.sequence != at + 1 {
                followed_on = false;
                break;
            }
            self.publish_envelope(&envelope, &mut window, acked).await?;
            at = envelope.sequence;
            *cursor = Some(at);
        }
        while !window.is_empty() {
            settle_oldest(&mut window, acked).await?;
        }
        Ok(followed_on)
    }

    /// Publishes one envelope, its id as `Nats-Msg-Id`, keeping at most
    /// `MAX_IN_FLIGHT` acknowledgements outstanding.
    async fn publish_envelope(
        &self,
        envelope: &Envelope,
        window: &mut VecDeque<(i64, jetstream::context::PublishAckFuture)>,
        acked: &watch::Sender<Option<i64>>,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.event_id.to_string().as_str());
        let payload = serde_json::to_vec(envelope).map_err(|e| BusError::Corrupt(e.to_string()))?;
        let ack = self
            .js
            .publish_with_headers(subject(&self.prefix, envelope), headers, payload.into())
            .await
            .map_err(transport_error)?;
        window.push_back((envelope.sequence, ack));
        if window.len() > MAX_IN_FLIGHT {
            settle_oldest(window, acked).await?;
        }
        Ok(())
    }

    /// Reads and publishes what follows `cursor` until a read comes back short, then
    /// waits for the acknowledgements still out. Returns the size of the last read.
    async fn relay_round(
        &self,
        db: &Db,
        cursor: &mut Option<i64>,
        gaps: &mut outbox::Gaps,
        acked: &watch::Sender<Option<i64>>,
    ) -> Result<usize, BusError> {
        let source = db.module();
        let batch = usize::try_from(RELAY_BATCH).unwrap_or(usize::MAX);
        let mut window = VecDeque::new();
        loop {
            let after = match *cursor {
                Some(at) => at,
                None => {
                    let at = db
                        .read(move |conn| {
                            outbox::relay_position(conn, source).map_err(DbError::from)
                        })
                        .await?;
                    // Everything through it is published: handed-over envelopes
                    // that follow on may go out from here.
                    *cursor = Some(at);
                    at
                }
            };
            let mut seen = std::mem::take(gaps);
            let (rows, seen) = db
                .read(move |conn| {
                    let rows = seen
                        .read(conn, source, after, RELAY_BATCH)
                        .map_err(DbError::from)?;
                    Ok::<_, DbError>((rows, seen))
                })
                .await?;
            *gaps = seen;
            let read = rows.len();
            for row in rows {
                let envelope = row.map_err(BusError::Corrupt)?;
                self.publish_envelope(&envelope, &mut window, acked).await?;
                *cursor = Some(envelope.sequence);
            }
            if read < batch {
                while !window.is_empty() {
                    settle_oldest(&mut window, acked).await?;
                }
                return Ok(read);
            }
        }
    }
}

/// Publishes in flight at once per relay.
const MAX_IN_FLIGHT: usize = 256;

/// Waits for the oldest publish in flight; its sequence is then acknowledged (the
/// ones before it were). A failure ends the round: later messages may be stored,
/// and the relay starts again after the last acknowledged one.
async fn settle_oldest(
    window: &mut VecDeque<(i64, jetstream::context::PublishAckFuture)>,
    acked: &watch::Sender<Option<i64>>,
) -> Result<(), BusError> {
    if let Some((sequence, ack)) = window.pop_front() {
        ack.await.map_err(transport_error)?;
        acked.send_replace(Some(sequence));
    }
    Ok(())
}

/// Writes the relay position as acknowledgements move it: the latest value each
/// time, at most every 250 ms, so many acknowledgements make one write.
async fn keep_position(db: Db, mut acked: watch::Receiver<Option<i64>>) {
    let source = db.module();
    // At most one write per interval: the position only tells a restarted relay
    // where to start, and what it publishes again is dropped by the server (its
    // duplicate window is two minutes), so a write per acknowledgement would only
    // add commits.
    const EVERY: Duration = Duration::from_millis(250);
    loop {
        let ended = acked.changed().await.is_err();
        let latest = *acked.borrow_and_update();
        if let Some(sequence) = latest {
            let written = db
                .write(move |conn| {
                    outbox::set_relay_position(conn, source, sequence).map_err(DbError::from)
                })
                .await;
            if let Err(e) = written {
                // The next acknowledgement writes again; until then a restart
                // publishes a few events twice, and the server drops them.
                tracing::warn!(module = source, error = %e, "recording the relay position failed");
            }
        }
        if ended {
            return;
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    prefix: &str,
    source: &str,
) -> Result<jetstream::stream::Stream, BusError> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream_name(prefix, source),
        subjects: vec![format!("{prefix}.{source}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(transport_error)
}

impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn reaches(&self, _source: &str) -> bool {
        true
    }

    fn subscribe(&self, consumer: &str, source: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(NatsSubscription {
            client: self.client.clone(),
            js: self.js.clone(),
            prefix: self.prefix.clone(),
            source: source.to_string(),
            durable: consumer.to_string(),
            consumer: None,
            ack_wait: self.ack_wait,
            holder: self.holder.clone(),
            lease_ttl: lease_ttl(self.ack_wait),
            request: Request::for_ack_wait(self.ack_wait),
            holding: false,
            renewed: None,
            renewing: None,
            failing: false,
            pulls: None,
            buffer: VecDeque::new(),
            pulled: Vec::new(),
            released: Vec::new(),
        }))
    }

    fn is_up(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

struct NatsSubscription {
    /// Its connection's state is read at every wait.
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    source: String,
    durable: String,
    consumer: Option<PullConsumer>,
    /// For the consumer if this subscription creates it.
    ack_wait: Duration,
    holder: String,
    /// Follows the consumer's actual ack wait once known.
    lease_ttl: Duration,
    /// What a pull request asks for and how long it stays open at the server:
    /// follows the ack wait, within the consumer's own limits.
    request: Request,
    /// Whether the last pass found this process the consumer's holder.
    holding: bool,
    /// When a pass that committed last renewed the lease, and for how long
    /// (`None`: not known to hold it).
    renewed: Option<(Instant, Duration)>,
    /// The same for the pass in progress, until that pass commits.
    renewing: Option<(Instant, Duration)>,
    /// Whether the last pass was rolled back.
    failing: bool,
    /// Pull requests and the inbox they deliver to, once the consumer is known.
    pulls: Option<Pulls>,
    /// Delivered, not yet handed to a pass.
    buffer: VecDeque<(Envelope, jetstream::Message)>,
    /// Handed to the pass in progress; acknowledged once it commits.
    pulled: Vec<(Envelope, jetstream::Message)>,
    /// Delivered while the lease was lost: handed back to the server (nak), so the
    /// holder gets them next, ahead of anything newer.
    released: Vec<jetstream::Message>,
}

/// How long to wait for the next message when the last one said more were
/// ready for this consumer and an open request still asks for them.
const MORE_READY: Duration = Duration::from_millis(5);

impl NatsSubscription {
    async fn consumer(&mut self) -> Result<PullConsumer, BusError> {
        if let Some(consumer) = &self.consumer {
            return Ok(consumer.clone());
        }
        let stream = ensure_stream(&self.js, &self.prefix, &self.source).await?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &self.durable,
                jetstream::consumer::pull::Config {
                    durable_name: Some(self.durable.clone()),
                    filter_subject: format!("{}.{}.>", self.prefix, self.source),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: 1024,
                    ..Default::default()
                },
            )
            .await
            .map_err(transport_error)?;
        let config = &consumer.cached_info().config;
        self.lease_ttl = lease_ttl(config.ack_wait);
        self.request = Request::for_consumer(config);
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    fn keep(&mut self, message: jetstream::Message) {
        match serde_json::from_slice::<Envelope>(&message.message.payload) {
            Ok(envelope) => self.buffer.push_back((envelope, message)),
            Err(e) => {
                // Not an envelope: nothing can ever handle it. Drop it for good.
                tracing::error!(subject = %message.message.subject, error = %e, "undecodable message terminated");
                tokio::spawn(async move {
                    let _ = message.ack_with(jetstream::AckKind::Term).await;
                });
            }
        }
    }

    /// Whether this process may ask for messages: it holds the lease, renewed by a
    /// committed pass within a quarter of its length (see `Request::expiry`).
    fn may_request(&self) -> bool {
        self.holding && self.renewed.is_some_and(|(at, ttl)| at.elapsed() < ttl / 4)
    }

    /// Drops the inbox, and with it whatever requests still point at it, once none
    /// of them may deliver at this process's right: the connection dropped (a
    /// request queued meanwhile would reach the server late, and the server skips
    /// requests whose inbox has no subscriber), or the lease was renewed longer ago
    /// than requests are sent plus their expiry. What the inbox received first is
    /// kept, to be handled or handed back.
    fn retire_pulls(&mut self) {
        if self.pulls.is_none() {
            return;
        }
        let connected = self.connected();
        let outlived = !self.may_request()
            && self
                .renewed
                .is_none_or(|(at, ttl)| at.elapsed() > ttl / 4 + self.request.expiry + PULL_GRACE);
        if connected && !outlived {
            return;
        }
        if let Err(e) = self.take_ready() {
            tracing::debug!(consumer = %self.durable, error = %e, "inbox retired after an error");
        }
        self.pulls = None;
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// After a failure: requests are sent afresh. The inbox stays subscribed, so
    /// that what the old ones still deliver is received, unless it has ended.
    fn forget_requests(&mut self) {
        match &mut self.pulls {
            Some(pulls) if pulls.ended() => self.pulls = None,
            Some(pulls) => pulls.forget(),
            None => {}
        }
    }

    /// Moves what the inbox has received into the buffer, without waiting.
    fn take_ready(&mut self) -> Result<(), BusError> {
        while let Some(message) = self.pulls.as_mut().map_or(Ok(None), Pulls::ready)? {
            self.keep(message);
        }
        Ok(())
    }

    /// Takes what has arrived; when nothing has, waits up to `timeout` for a
    /// message, keeping a request open meanwhile, then takes what arrived with it,
    /// waiting a little for what the server said was ready behind it (one
    /// transaction's events come together, often one this consumer passes by
    /// first). Returns early, empty-handed, once the lease needs renewing, so
    /// that a pass renews it and requests go on (with a gap only if that pass
    /// takes longer than what is left of the last request).
    async fn receive(&mut self, timeout: Duration) -> Result<(), BusError> {
        if !self.connected() {
            // Readiness says the transport is down; the client reconnects.
            tokio::time::sleep(timeout).await;
            return Ok(());
        }
        let consumer = answered("the consumer's info", NO_ANSWER, self.consumer()).await?;
        if self.pulls.is_none() {
            self.pulls = Some(Pulls::new(&self.js).await?);
        }
        let until = Instant::now() + timeout;
        loop {
            self.take_ready()?;
            if !self.buffer.is_empty() {
                break;
            }
            let renew_by = match self.renewed {
                Some((at, ttl)) if self.may_request() => at + ttl / 4,
                // Renewal is due: the pass that follows this call renews.
                _ => return Ok(()),
            };
            if !self.connected() {
                // A request now would wait in the client for the reconnect: the
                // next wait retires the inbox instead.
                return Ok(());
            }
            let request = self.request;
            let Some(pulls) = self.pulls.as_mut() else {
                return Ok(());
            };
            pulls.keep_open(&consumer, request).await?;
            let wake = until.min(renew_by);
            match pulls.next(wake).await? {
                Some(message) => self.keep(message),
                None if Instant::now() >= wake => return Ok(()),
                None => {}
            }
        }
        // More behind it, and a request open to bring it: wait a moment for it.
        while let Some(pulls) = self.pulls.as_mut()
            && pulls.more_coming()
        {
            match pulls.next(Instant::now() + MORE_READY).await? {
                Some(message) => {
                    self.keep(message);
                    self.take_ready()?;
                }
                None => break,
            }
        }
        Ok(())
    }
}

/// How long after the server would have answered a request the client gives up.
const NO_ANSWER: Duration = Duration::from_secs(2);

/// `request`, or a transport error naming `what` went unanswered within `limit`.
async fn answered<T>(
    what: &str,
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| Err(BusError::Transport(format!("no answer to {what}"))))
}

impl Subscription for NatsSubscription {
    fn wait(&mut self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.retire_pulls();
            if self.failing {
                // After a failed pass the wait is its backoff, even with events
                // waiting in the buffer (they are the ones that failed).
                tokio::time::sleep(timeout).await;
                return !self.buffer.is_empty();
            }
            if !self.holding {
                // Another replica holds the lease: try again after the wait. What
                // requests sent as holder still deliver is handed back by the pass.
                if let Err(e) = self.take_ready() {
                    tracing::warn!(consumer = %self.durable, source = %self.source, error = %e, "receiving from NATS failed");
                    self.forget_requests();
                }
                tokio::time::sleep(timeout).await;
                return false;
            }
            if self.buffer.is_empty()
                && let Err(e) = self.receive(timeout).await
            {
                tracing::warn!(consumer = %self.durable, source = %self.source, error = %e, "receiving from NATS failed");
                self.consumer = None;
                self.forget_requests();
                tokio::time::sleep(timeout.min(Duration::from_millis(500))).await;
            }
            !self.buffer.is_empty()
        })
    }

    fn pull(&mut self, conn: &mut AnyConnection, max: usize) -> Result<Vec<Envelope>, BusError> {
        // Taken first: the lease runs from no later than this.
        let renewing = (Instant::now(), self.lease_ttl);
        let now = crate::time::now();
        let until = now + chrono::Duration::from_std(self.lease_ttl).unwrap_or_default();
        self.holding = lease::hold(conn, &self.durable, &self.source, &self.holder, now, until)?;
        if self.holding {
            // Counts once the pass commits (`settle`).
            self.renewing = Some(renewing);
        } else {
            self.renewed = None;
            self.released
                .extend(self.buffer.drain(..).map(|(_, message)| message));
            return Ok(Vec::new());
        }
        let take = max.min(self.buffer.len());
        self.pulled = self.buffer.drain(..take).collect();
        Ok(self.pulled.iter().map(|(e, _)| e.clone()).collect())
    }

    fn advance(
        &mut self,
        conn: &mut AnyConnection,
        _last: &Envelope,
        handled: &Handled<'_>,
    ) -> Result<(), BusError> {
        // The position is the server's, moved by the acknowledgements after commit.
        Ok(record_handled(conn, handled)?)
    }

    fn may_redeliver(&self) -> bool {
        true
    }

    /// Nothing delivered is wanted, and the lease held has most of its time left (a
    /// standby always runs its pass: that is how it takes over). What is passed by
    /// is acknowledged at the next `settle(true)`, as a pass's events would be.
    fn nothing_wanted(&mut self, wants: &dyn Fn(&str) -> bool) -> Result<bool, BusError> {
        if !self.may_request() || self.buffer.iter().any(|(event, _)| wants(&event.name)) {
            return Ok(false);
        }
        self.pulled.extend(self.buffer.drain(..));
        Ok(true)
    }

    fn rewind(&mut self) {
        for item in std::mem::take(&mut self.pulled).into_iter().rev() {
            self.buffer.push_front(item);
        }
    }

    fn settle(&mut self, committed: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for message in std::mem::take(&mut self.released) {
                if let Err(e) = message.ack_with(jetstream::AckKind::Nak(None)).await {
                    // It comes again after the ack wait instead.
                    tracing::warn!(error = %e, "handing back an event failed");
                }
            }
            let pulled = std::mem::take(&mut self.pulled);
            let renewing = self.renewing.take();
            self.failing = !committed;
            if committed {
                if renewing.is_some() {
                    self.renewed = renewing;
                }
                for (_, message) in pulled {
                    if let Err(e) = message.ack().await {
                        // It comes again after the ack wait; the inbox makes it a no-op.
                        tracing::warn!(error = %e, "acknowledging a handled event failed");
                    }
                }
            } else {
                // Handled again next pass, before anything delivered after it.
                for item in pulled.into_iter().rev() {
                    self.buffer.push_front(item);
                }
            }
        })
    }
}
