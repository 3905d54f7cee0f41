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
