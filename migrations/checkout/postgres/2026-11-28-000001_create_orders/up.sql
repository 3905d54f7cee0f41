CREATE TABLE orders (
    id TEXT PRIMARY KEY NOT NULL,
    customer_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled', 'fulfilled')),
    reason TEXT,
    total_minor BIGINT NOT NULL CHECK (total_minor >= 0),
    currency TEXT NOT NULL,
    shipping_name TEXT NOT NULL,
    shipping_line1 TEXT NOT NULL,
    shipping_city TEXT NOT NULL,
    shipping_postal_code TEXT NOT NULL,
    shipping_country TEXT NOT NULL,
    payment_token TEXT NOT NULL,
    -- awaiting_stock, charge_due, charged, declined, refund_due, refunded, none
    payment_state TEXT NOT NULL,
    payment_attempts INTEGER NOT NULL,
    payment_due_at TIMESTAMP,
    payment_error TEXT,
    -- none, preparing, dispatched, delivered, cancelled
    shipment_state TEXT NOT NULL,
    cancel_requested BOOLEAN NOT NULL,
    -- The correlation and trace the saga's later steps continue.
    correlation_id TEXT NOT NULL,
    traceparent TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX orders_by_customer ON orders (customer_id, created_at);
CREATE INDEX orders_payment_due ON orders (payment_due_at);

CREATE TABLE order_lines (
    order_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    name TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

-- Placement requests by Idempotency-Key: the same key and body give the same order.
CREATE TABLE idempotency_keys (
    customer_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    order_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (customer_id, idempotency_key)
);

-- The built-in test payment gateway's own ledger: one charge per order, ever.
CREATE TABLE test_gateway_charges (
    order_id TEXT PRIMARY KEY NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('succeeded', 'declined')),
    refunded BOOLEAN NOT NULL,
    created_at TIMESTAMP NOT NULL
);
