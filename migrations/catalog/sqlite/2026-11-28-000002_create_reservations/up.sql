-- Stock held for orders: reserved at placement, released on rejection or
-- cancellation, committed (taken from on hand) when the shipment leaves.
CREATE TABLE reservations (
    order_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released', 'committed')),
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

-- Orders whose reservation was refused, so a redelivered placement is not retried.
CREATE TABLE reservation_refusals (
    order_id TEXT PRIMARY KEY NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
