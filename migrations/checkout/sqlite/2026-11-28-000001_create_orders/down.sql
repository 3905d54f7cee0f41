DROP TABLE test_gateway_charges;
DROP TABLE idempotency_keys;
DROP TABLE order_lines;
DROP TABLE orders;
