DROP TABLE colony_dead_letters;
DROP TABLE colony_deferred;
DROP TABLE colony_inbox;
DROP TABLE colony_consumer_positions;
DROP TABLE colony_outbox_head;
DROP TABLE colony_outbox;
