-- Outbox sequence numbers from a sequence: publishers no longer take turns through
-- their commits on the head row. Numbers follow the order events were published in;
-- readers wait at a gap until it fills or every transaction that could fill it has
-- ended (kernel::outbox::Gaps).
CREATE SEQUENCE colony_outbox_sequence;
SELECT setval('colony_outbox_sequence', GREATEST(last_sequence, 1), last_sequence > 0)
FROM colony_outbox_head;
