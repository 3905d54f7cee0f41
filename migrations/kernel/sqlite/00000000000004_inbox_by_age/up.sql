-- Inbox records are pruned by when they were handled (bus.retention_hours).
CREATE INDEX colony_inbox_by_age ON colony_inbox (consumer, handled_at);
