-- Which process handles a consumer's events when its transport is shared by
-- replicas (NATS): one holder at a time, so events of a key are handled in order.
CREATE TABLE colony_consumer_leases (
    consumer TEXT NOT NULL,
    source TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    PRIMARY KEY (consumer, source)
);
