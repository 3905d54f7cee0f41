use kernel::auth::Role;
use serde_json::{Value, json};

use crate::helpers::{TestDatabase, assert_problem, spawn_app};
use crate::on_both_backends;

async fn a_seller_lists_a_product_and_anyone_reads_it(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let res = app
        .post(
            "/api/v1/catalog/products",
            Some(&seller),
            &json!({"sku": "TEA-01", "name": "Sencha", "price": {"amount_minor": 1250, "currency": "EUR"}, "stock": 7}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let created: Value = res.json().await.unwrap();
    assert_eq!(
        location,
        format!(
            "/api/v1/catalog/products/{}",
            created["id"].as_str().unwrap()
        )
    );
    assert_eq!(
        created["price"],
        json!({"amount_minor": 1250, "currency": "EUR"})
    );
    assert_eq!(
        created["stock"],
        json!({"on_hand": 7, "reserved": 0, "available": 7})
    );
    assert_eq!(created["seller_id"], "seller-1");

    let read: Value = app.get(&location, None).await.json().await.unwrap();
    assert_eq!(read, created);
    let listed: Value = app
        .get("/api/v1/catalog/products", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([created]));
    assert_eq!(listed["next_cursor"], Value::Null);
    assert_eq!(
        app.published("catalog").await,
        1,
        "product listed event in the outbox"
    );
    app.stop().await;
}

async fn products_are_paged_with_a_cursor(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.create_product(&seller, &format!("SKU-{i}"), 100 + i, 1)
                .await["id"]
                .clone(),
        );
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/catalog/products?limit=2".to_string();
    let mut pages = 0;
    loop {
        let page: Value = app.get(&path, None).await.json().await.unwrap();
        pages += 1;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|p| p["id"].clone()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/catalog/products?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every product once, oldest first");

    assert_problem(
        app.get("/api/v1/catalog/products?cursor=bm9wZQ", None)
            .await,
        400,
        "invalid_cursor",
    )
    .await;
    assert_problem(
        app.get("/api/v1/catalog/products?limit=0", None).await,
        422,
        "validation_failed",
    )
    .await;
    assert_problem(
        app.get("/api/v1/catalog/products?limit=500", None).await,
        422,
        "validation_failed",
    )
    .await;
    assert_problem(
        app.get("/api/v1/catalog/products?limit=ten", None).await,
        400,
        "invalid_query",
    )
    .await;
    app.stop().await;
}

async fn a_seller_updates_details_price_and_stock(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let product = app.create_product(&seller, "MUG-1", 900, 3).await;
    let path = format!(
        "/api/v1/catalog/products/{}",
        product["id"].as_str().unwrap()
    );

    let res = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&seller),
            Some(&json!({"name": "Big mug", "description": null, "price": {"amount_minor": 1100, "currency": "EUR"}})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["name"], "Big mug");
    assert_eq!(updated["description"], Value::Null);
    assert_eq!(updated["price"]["amount_minor"], 1100);

    let res = app
        .request(
            reqwest::Method::PUT,
            &format!("{path}/stock"),
            Some(&seller),
            Some(&json!({"on_hand": 12})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let stocked: Value = res.json().await.unwrap();
    assert_eq!(
        stocked["stock"],
        json!({"on_hand": 12, "reserved": 0, "available": 12})
    );

    // listed + details changed + price changed + stock changed
    assert_eq!(app.published("catalog").await, 4);
    // The same values again change nothing and publish nothing.
    let res = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&seller),
            Some(&json!({"name": "Big mug"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.published("catalog").await, 4);

    let res = app
        .request(
            reqwest::Method::PUT,
            &format!("{path}/stock"),
            Some(&seller),
            Some(&json!({"on_hand": -1})),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let read: Value = app.get(&path, None).await.json().await.unwrap();
    assert_eq!(
        read["stock"]["on_hand"], 12,
        "a rejected request writes nothing"
    );
    app.stop().await;
}

async fn only_sellers_and_admins_change_the_catalog(db: TestDatabase) {
    let app = spawn_app(db).await;
    let body = json!({"sku": "X-1", "name": "X", "price": {"amount_minor": 1, "currency": "EUR"}, "stock": 1});
    let res = app.post("/api/v1/catalog/products", None, &body).await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_problem(res, 401, "unauthorized").await;
    assert_problem(
        app.post("/api/v1/catalog/products", Some("not-a-token"), &body)
            .await,
        401,
        "unauthorized",
    )
    .await;
    let other_secret = kernel::auth::Authenticator::new("another-secret").issue(
        "seller-1",
        Role::Seller,
        std::time::Duration::from_secs(60),
    );
    assert_problem(
        app.post("/api/v1/catalog/products", Some(&other_secret), &body)
            .await,
        401,
        "unauthorized",
    )
    .await;
    let customer = app.token("customer-1", Role::Customer);
    assert_problem(
        app.post("/api/v1/catalog/products", Some(&customer), &body)
            .await,
        403,
        "forbidden",
    )
    .await;

    let product = app.create_product(&app.seller(), "OWNED-1", 500, 2).await;
    let path = format!(
        "/api/v1/catalog/products/{}",
        product["id"].as_str().unwrap()
    );
    let rival = app.token("seller-2", Role::Seller);
    let patch = json!({"name": "Hijacked"});
    let res = app
        .request(reqwest::Method::PATCH, &path, Some(&rival), Some(&patch))
        .await;
    assert_problem(res, 403, "not_product_owner").await;
    let res = app
        .request(reqwest::Method::PATCH, &path, Some(&customer), Some(&patch))
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin()),
            Some(&json!({"name": "Renamed by admin"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let read: Value = app.get(&path, None).await.json().await.unwrap();
    assert_eq!(read["name"], "Renamed by admin");
    app.stop().await;
}

async fn a_duplicate_sku_is_a_conflict(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    app.create_product(&seller, "DUP-1", 100, 1).await;
    let res = app
        .post(
            "/api/v1/catalog/products",
            Some(&app.token("seller-2", Role::Seller)),
            &json!({"sku": "DUP-1", "name": "Copy", "price": {"amount_minor": 1, "currency": "EUR"}, "stock": 1}),
        )
        .await;
    assert_problem(res, 409, "duplicate_sku").await;
    let listed: Value = app
        .get("/api/v1/catalog/products", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.published("catalog").await,
        1,
        "the rejected listing published nothing"
    );
    app.stop().await;
}

async fn a_delisted_product_leaves_the_list_and_cannot_change(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let product = app.create_product(&seller, "GONE-1", 100, 1).await;
    let path = format!(
        "/api/v1/catalog/products/{}",
        product["id"].as_str().unwrap()
    );
    let res = app
        .request(reqwest::Method::DELETE, &path, Some(&seller), None)
        .await;
    assert_eq!(res.status(), 204);
    let listed: Value = app
        .get("/api/v1/catalog/products", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));
    let read: Value = app.get(&path, None).await.json().await.unwrap();
    assert_eq!(read["status"], "delisted");
    let res = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&seller),
            Some(&json!({"name": "Back"})),
        )
        .await;
    assert_problem(res, 409, "product_delisted").await;
    assert_eq!(app.published("catalog").await, 2, "listed, delisted");
    app.stop().await;
}

async fn a_restart_keeps_the_data(db: TestDatabase) {
    let app = spawn_app(db).await;
    let product = app.create_product(&app.seller(), "KEEP-1", 4200, 9).await;
    let db = app.stop().await;
    let app = spawn_app(db).await;
    let path = format!(
        "/api/v1/catalog/products/{}",
        product["id"].as_str().unwrap()
    );
    let read: Value = app.get(&path, None).await.json().await.unwrap();
    assert_eq!(read, product);
    assert_eq!(app.published("catalog").await, 1);
    app.stop().await;
}

async fn a_request_trace_continues_into_the_events_it_publishes(db: TestDatabase) {
    let app = spawn_app(db).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = app
        .client
        .post(format!("{}/api/v1/catalog/products", app.address))
        .bearer_auth(app.seller())
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"sku": "TRACE-1", "name": "Traced", "price": {"amount_minor": 1, "currency": "EUR"}, "stock": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let echoed = res.headers()["traceparent"].to_str().unwrap().to_string();
    assert!(echoed.starts_with(&format!("00-{trace_id}-")), "{echoed}");
    let catalog = app.runtime().module("catalog").unwrap().db.clone();
    let events = catalog
        .read(|conn| {
            kernel::outbox::read_after(conn, "catalog", 0, 10).map_err(kernel::db::DbError::from)
        })
        .await
        .unwrap();
    let event = events.into_iter().next().unwrap().unwrap();
    assert_eq!(event.name, "catalog.product_listed.v1");
    assert_eq!(event.trace().unwrap().trace_id_hex(), trace_id);
    app.stop().await;
}

on_both_backends!(
    a_seller_lists_a_product_and_anyone_reads_it,
    products_are_paged_with_a_cursor,
    a_seller_updates_details_price_and_stock,
    only_sellers_and_admins_change_the_catalog,
    a_duplicate_sku_is_a_conflict,
    a_delisted_product_leaves_the_list_and_cannot_change,
    a_restart_keeps_the_data,
    a_request_trace_continues_into_the_events_it_publishes,
);
