DROP TABLE shipment_events;
DROP TABLE shipments;
