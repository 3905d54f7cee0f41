ALTER TABLE products
    ALTER COLUMN price_minor TYPE BIGINT,
    ADD CONSTRAINT products_price_minor_check CHECK (price_minor >= 0),
    ADD CONSTRAINT products_on_hand_check CHECK (on_hand >= 0);
ALTER TABLE reservations
    ALTER COLUMN quantity TYPE BIGINT,
    ALTER COLUMN status TYPE TEXT,
    ADD CONSTRAINT reservations_quantity_check CHECK (quantity > 0),
    ADD CONSTRAINT reservations_status_check
        CHECK (status IN ('reserved', 'released', 'committed'));
DROP DOMAIN minor_amount, line_quantity, reservation_status;
