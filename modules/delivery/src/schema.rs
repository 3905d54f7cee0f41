diesel::table! {
    shipments (id) {
        id -> Text,
        order_id -> Text,
        customer_id -> Text,
        status -> Text,
        name -> Text,
        line1 -> Text,
        city -> Text,
        postal_code -> Text,
        country -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    shipment_events (shipment_id, status) {
        shipment_id -> Text,
        status -> Text,
        at -> Timestamp,
    }
}
