-- Idempotency keys expire (modules.checkout.idempotency_key_hours): the pruner
-- finds the old ones by age.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
