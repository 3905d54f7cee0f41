-- CHECK constraints on a table are parsed again by every statement that writes the
-- table (PostgreSQL keeps no parsed form of them between statements); a domain's are
-- parsed once per connection and kept. The single-column checks on the order's path
-- become domains. Each column takes its domain first without a constraint (no
-- rewrite of the table), and the domain's constraint is added after, which checks the
-- rows already there (a scan, not a rewrite).
CREATE DOMAIN order_status AS TEXT;
CREATE DOMAIN minor_amount AS BIGINT;
CREATE DOMAIN line_quantity AS BIGINT;
CREATE DOMAIN charge_outcome AS TEXT;

ALTER TABLE orders
    DROP CONSTRAINT orders_status_check,
    DROP CONSTRAINT orders_total_minor_check,
    ALTER COLUMN status TYPE order_status,
    ALTER COLUMN total_minor TYPE minor_amount;
ALTER TABLE order_lines
    DROP CONSTRAINT order_lines_quantity_check,
    ALTER COLUMN quantity TYPE line_quantity;
ALTER TABLE test_gateway_charges
    DROP CONSTRAINT test_gateway_charges_outcome_check,
    ALTER COLUMN outcome TYPE charge_outcome;

ALTER DOMAIN order_status ADD CONSTRAINT order_status_known
    CHECK (VALUE IN ('pending', 'confirmed', 'rejected', 'cancelled', 'fulfilled'));
ALTER DOMAIN minor_amount ADD CONSTRAINT minor_amount_not_negative CHECK (VALUE >= 0);
ALTER DOMAIN line_quantity ADD CONSTRAINT line_quantity_positive CHECK (VALUE > 0);
ALTER DOMAIN charge_outcome ADD CONSTRAINT charge_outcome_known
    CHECK (VALUE IN ('succeeded', 'declined'));
