diesel::table! {
    notifications (id) {
        id -> Text,
        customer_id -> Text,
        order_id -> Text,
        kind -> Text,
        channel -> Text,
        status -> Text,
        created_at -> Timestamp,
    }
}
