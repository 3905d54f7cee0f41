UPDATE colony_outbox_head
SET last_sequence = COALESCE((SELECT max(sequence) FROM colony_outbox), 0);
DROP SEQUENCE colony_outbox_sequence;
