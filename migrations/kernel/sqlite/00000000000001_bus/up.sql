-- The event machinery every module carries in its own database.

-- Events this module published, in the same transaction as the state change.
-- `sequence` is the rowid (one page written per event); event ids are UUIDv7 made
-- here, and consumers deduplicate them in their inboxes.
CREATE TABLE colony_outbox (
    sequence INTEGER PRIMARY KEY NOT NULL,
    event_id TEXT NOT NULL,
    name TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    occurred_at TIMESTAMP NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    traceparent TEXT,
    payload TEXT NOT NULL
);

-- The last sequence handed out. On SQLite, whose writers are serialised anyway, the
-- next sequence is the outbox's largest plus one, so this row stays untouched.
CREATE TABLE colony_outbox_head (
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_sequence BIGINT NOT NULL
);
INSERT INTO colony_outbox_head (id, last_sequence) VALUES (1, 0);

-- How far each consumer of this module has read each source.
CREATE TABLE colony_consumer_positions (
    consumer TEXT NOT NULL,
    source TEXT NOT NULL,
    position BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (consumer, source)
);

-- Events already handled, recorded in the handler's transaction.
CREATE TABLE colony_inbox (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    handled_at TIMESTAMP NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

-- Events waiting for a retry, and the later events of the same key queued behind them.
CREATE TABLE colony_deferred (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    aggregate_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMP NOT NULL,
    last_error TEXT,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX colony_deferred_by_key ON colony_deferred (consumer, source, aggregate_id, sequence);

-- Events a consumer gave up on, kept with their error until replayed.
CREATE TABLE colony_dead_letters (
    id TEXT PRIMARY KEY NOT NULL,
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    aggregate_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    parked_at TIMESTAMP NOT NULL,
    replayed_at TIMESTAMP
);
CREATE INDEX colony_dead_letters_open ON colony_dead_letters (consumer, replayed_at);
