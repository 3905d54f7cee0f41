-- Cart's own copy of what it needs from the catalog, kept from catalog events.
CREATE TABLE cart_products (
    product_id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    price_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    available BIGINT NOT NULL,
    listed BOOLEAN NOT NULL,
    updated_at TIMESTAMP NOT NULL
);

-- One cart per customer: the lines they put in it.
CREATE TABLE cart_items (
    customer_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    added_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (customer_id, product_id)
);
CREATE INDEX cart_items_by_product ON cart_items (product_id);
