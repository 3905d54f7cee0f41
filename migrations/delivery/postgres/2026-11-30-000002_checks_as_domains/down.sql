ALTER TABLE shipments
    ALTER COLUMN status TYPE TEXT,
    ADD CONSTRAINT shipments_status_check
        CHECK (status IN ('preparing', 'dispatched', 'delivered', 'cancelled'));
DROP DOMAIN shipment_status;
