ALTER TABLE orders
    ALTER COLUMN status TYPE TEXT,
    ALTER COLUMN total_minor TYPE BIGINT,
    ADD CONSTRAINT orders_status_check
        CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled', 'fulfilled')),
    ADD CONSTRAINT orders_total_minor_check CHECK (total_minor >= 0);
ALTER TABLE order_lines
    ALTER COLUMN quantity TYPE BIGINT,
    ADD CONSTRAINT order_lines_quantity_check CHECK (quantity > 0);
ALTER TABLE test_gateway_charges
    ALTER COLUMN outcome TYPE TEXT,
    ADD CONSTRAINT test_gateway_charges_outcome_check
        CHECK (outcome IN ('succeeded', 'declined'));
DROP DOMAIN order_status, minor_amount, line_quantity, charge_outcome;
