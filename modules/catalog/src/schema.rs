diesel::table! {
    products (id) {
        id -> Text,
        sku -> Text,
        seller_id -> Text,
        name -> Text,
        description -> Nullable<Text>,
        price_minor -> BigInt,
        currency -> Text,
        on_hand -> BigInt,
        reserved -> BigInt,
        listed -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    reservations (order_id, product_id) {
        order_id -> Text,
        product_id -> Text,
        quantity -> BigInt,
        status -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    reservation_refusals (order_id) {
        order_id -> Text,
        reason -> Text,
        created_at -> Timestamp,
    }
}
