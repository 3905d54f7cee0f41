diesel::table! {
    cart_products (product_id) {
        product_id -> Text,
        name -> Text,
        price_minor -> BigInt,
        currency -> Text,
        listed -> Bool,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    cart_items (customer_id, product_id) {
        customer_id -> Text,
        product_id -> Text,
        quantity -> BigInt,
        added_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::joinable!(cart_items -> cart_products (product_id));
diesel::allow_tables_to_appear_in_same_query!(cart_items, cart_products);
