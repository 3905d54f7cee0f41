//! Diesel tables of the kernel's event machinery, present in every module's database.

diesel::table! {
    colony_outbox (sequence) {
        sequence -> BigInt,
        event_id -> Text,
        name -> Text,
        aggregate_id -> Text,
        occurred_at -> Timestamp,
        correlation_id -> Text,
        causation_id -> Nullable<Text>,
        traceparent -> Nullable<Text>,
        payload -> Text,
    }
}

diesel::table! {
    colony_consumer_positions (consumer, source) {
        consumer -> Text,
        source -> Text,
        position -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    colony_inbox (consumer, event_id) {
        consumer -> Text,
        event_id -> Text,
        handled_at -> Timestamp,
    }
}

diesel::table! {
    colony_deferred (consumer, event_id) {
        consumer -> Text,
        event_id -> Text,
        source -> Text,
        sequence -> BigInt,
        aggregate_id -> Text,
        envelope -> Text,
        attempts -> Integer,
        next_attempt_at -> Timestamp,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    colony_dead_letters (id) {
        id -> Text,
        consumer -> Text,
        event_id -> Text,
        source -> Text,
        name -> Text,
        sequence -> BigInt,
        aggregate_id -> Text,
        envelope -> Text,
        error -> Text,
        attempts -> Integer,
        parked_at -> Timestamp,
        replayed_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    colony_consumer_leases (consumer, source) {
        consumer -> Text,
        source -> Text,
        holder -> Text,
        expires_at -> Timestamp,
    }
}
