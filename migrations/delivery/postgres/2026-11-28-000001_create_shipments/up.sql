CREATE TABLE shipments (
    id TEXT PRIMARY KEY NOT NULL,
    order_id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('preparing', 'dispatched', 'delivered', 'cancelled')),
    name TEXT NOT NULL,
    line1 TEXT NOT NULL,
    city TEXT NOT NULL,
    postal_code TEXT NOT NULL,
    country TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX shipments_by_customer ON shipments (customer_id, created_at);
CREATE INDEX shipments_by_status ON shipments (status, updated_at);

-- The history shown with a shipment: one row per status it reached.
CREATE TABLE shipment_events (
    shipment_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at TIMESTAMP NOT NULL,
    PRIMARY KEY (shipment_id, status)
);
