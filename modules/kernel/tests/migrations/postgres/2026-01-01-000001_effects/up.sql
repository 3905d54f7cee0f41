-- What the test handlers do: one row per effect, so a second effect would show.
CREATE TABLE bus_test_effects (
    event_id TEXT NOT NULL,
    consumer TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    position BIGINT NOT NULL
);
