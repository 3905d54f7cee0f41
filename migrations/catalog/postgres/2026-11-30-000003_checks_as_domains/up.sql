-- CHECK constraints on a table are parsed again by every statement that writes the
-- table (PostgreSQL keeps no parsed form of them between statements); a domain's are
-- parsed once per connection and kept. The single-column checks on the order's path
-- become domains. Each column takes its domain first without a constraint (no
-- rewrite of the table), and the domain's constraint is added after, which checks the
-- rows already there (a scan, not a rewrite).
-- A product's reserved units stay a table check: it compares two columns. It also
-- implies that units on hand are not negative, so that column's own check goes.
CREATE DOMAIN minor_amount AS BIGINT;
CREATE DOMAIN line_quantity AS BIGINT;
CREATE DOMAIN reservation_status AS TEXT;

ALTER TABLE products
    DROP CONSTRAINT products_price_minor_check,
    DROP CONSTRAINT products_on_hand_check,
    ALTER COLUMN price_minor TYPE minor_amount;
ALTER TABLE reservations
    DROP CONSTRAINT reservations_quantity_check,
    DROP CONSTRAINT reservations_status_check,
    ALTER COLUMN quantity TYPE line_quantity,
    ALTER COLUMN status TYPE reservation_status;

ALTER DOMAIN minor_amount ADD CONSTRAINT minor_amount_not_negative CHECK (VALUE >= 0);
ALTER DOMAIN line_quantity ADD CONSTRAINT line_quantity_positive CHECK (VALUE > 0);
ALTER DOMAIN reservation_status ADD CONSTRAINT reservation_status_known
    CHECK (VALUE IN ('reserved', 'released', 'committed'));
