-- What was told to whom: one notification per kind per order, ever.
CREATE TABLE notifications (
    id TEXT PRIMARY KEY NOT NULL,
    customer_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (order_id, kind)
);
CREATE INDEX notifications_by_customer ON notifications (customer_id, created_at);
