diesel::table! {
    orders (id) {
        id -> Text,
        customer_id -> Text,
        status -> Text,
        reason -> Nullable<Text>,
        total_minor -> BigInt,
        currency -> Text,
        shipping_name -> Text,
        shipping_line1 -> Text,
        shipping_city -> Text,
        shipping_postal_code -> Text,
        shipping_country -> Text,
        payment_token -> Text,
        payment_state -> Text,
        payment_attempts -> Integer,
        payment_due_at -> Nullable<Timestamp>,
        payment_error -> Nullable<Text>,
        shipment_state -> Text,
        cancel_requested -> Bool,
        correlation_id -> Text,
        traceparent -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    order_lines (order_id, product_id) {
        order_id -> Text,
        product_id -> Text,
        name -> Text,
        quantity -> BigInt,
        unit_price_minor -> BigInt,
        currency -> Text,
    }
}

diesel::table! {
    idempotency_keys (customer_id, idempotency_key) {
        customer_id -> Text,
        idempotency_key -> Text,
        fingerprint -> Text,
        order_id -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    test_gateway_charges (order_id) {
        order_id -> Text,
        amount_minor -> BigInt,
        currency -> Text,
        outcome -> Text,
        refunded -> Bool,
        created_at -> Timestamp,
    }
}
