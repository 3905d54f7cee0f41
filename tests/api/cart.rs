use std::sync::Arc;

use contracts::cart::CartQueries;
use kernel::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestDatabase, assert_problem, eventually, spawn_app};
use crate::on_both_backends;

async fn a_cart_is_priced_from_catalog_events(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let customer = app.token("customer-1", Role::Customer);
    let tea = app.create_product(&seller, "TEA-1", 450, 10).await;
    let mug = app.create_product(&seller, "MUG-1", 1200, 3).await;
    let tea_id = tea["id"].as_str().unwrap();
    let mug_id = mug["id"].as_str().unwrap();

    let res = app.put_in_cart(&customer, tea_id, 2).await;
    assert_eq!(res.status(), 200);
    let res = app.put_in_cart(&customer, mug_id, 1).await;
    let cart: Value = res.json().await.unwrap();
    assert_eq!(
        cart["items"][0]["line_total"],
        json!({"amount_minor": 900, "currency": "EUR"})
    );
    assert_eq!(cart["items"][1]["name"], "Product MUG-1");
    assert_eq!(
        cart["total"],
        json!({"amount_minor": 2100, "currency": "EUR"})
    );

    // A price change in the catalog reaches the open cart.
    let res = app
        .request(
            Method::PATCH,
            &format!("/api/v1/catalog/products/{tea_id}"),
            Some(&seller),
            Some(&json!({"price": {"amount_minor": 500, "currency": "EUR"}, "name": "Sencha"})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let cart: Value = eventually("the new price in the cart", || async {
        let cart: Value = app
            .get("/api/v1/cart", Some(&customer))
            .await
            .json()
            .await
            .unwrap();
        (cart["total"]["amount_minor"] == 2200).then_some(cart)
    })
    .await;
    assert_eq!(cart["items"][0]["name"], "Sencha");

    // A delisted product stays visible as unavailable and cannot be added again.
    let res = app
        .request(
            Method::DELETE,
            &format!("/api/v1/catalog/products/{mug_id}"),
            Some(&seller),
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    eventually("the mug marked unavailable", || async {
        let cart: Value = app
            .get("/api/v1/cart", Some(&customer))
            .await
            .json()
            .await
            .unwrap();
        (cart["items"][1]["available"] == false).then_some(())
    })
    .await;
    assert_problem(
        app.put_in_cart(&customer, mug_id, 2).await,
        422,
        "product_unavailable",
    )
    .await;

    // Quantity 0 and DELETE both remove a line.
    let cart: Value = app
        .put_in_cart(&customer, mug_id, 0)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cart["items"].as_array().unwrap().len(), 1);
    let cart: Value = app
        .request(
            Method::DELETE,
            &format!("/api/v1/cart/items/{tea_id}"),
            Some(&customer),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cart, json!({"items": [], "total": null}));
    app.stop().await;
}

async fn one_currency_per_cart_and_bad_quantities_are_refused(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let customer = app.token("customer-1", Role::Customer);
    let euro = app.create_product(&seller, "EUR-1", 100, 5).await;
    let res = app
        .post(
            "/api/v1/catalog/products",
            Some(&seller),
            &json!({"sku": "USD-1", "name": "Dollar thing", "price": {"amount_minor": 100, "currency": "USD"}, "stock": 5}),
        )
        .await;
    let dollar: Value = res.json().await.unwrap();
    assert_eq!(
        app.put_in_cart(&customer, euro["id"].as_str().unwrap(), 1)
            .await
            .status(),
        200
    );
    let res = app
        .put_in_cart(&customer, dollar["id"].as_str().unwrap(), 1)
        .await;
    assert_problem(res, 422, "currency_mismatch").await;

    let path = format!("/api/v1/cart/items/{}", euro["id"].as_str().unwrap());
    for (body, code) in [
        (json!({"quantity": -1}), "validation_failed"),
        (json!({"quantity": 1000}), "validation_failed"),
        (json!({"quantity": "two"}), "invalid_body"),
        (json!({}), "invalid_body"),
    ] {
        let res = app
            .request(Method::PUT, &path, Some(&customer), Some(&body))
            .await;
        assert_problem(res, 422, code).await;
    }
    let unknown = format!("/api/v1/cart/items/{}", uuid::Uuid::now_v7());
    let res = app
        .request(
            Method::PUT,
            &unknown,
            Some(&customer),
            Some(&json!({"quantity": 1})),
        )
        .await;
    assert_problem(res, 404, "product_not_found").await;

    let cart: Value = app
        .get("/api/v1/cart", Some(&customer))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        cart["items"].as_array().unwrap().len(),
        1,
        "rejected requests changed nothing"
    );
    assert_eq!(cart["items"][0]["quantity"], 1);
    app.stop().await;
}

async fn each_customer_sees_only_their_own_cart(db: TestDatabase) {
    let app = spawn_app(db).await;
    let product = app.create_product(&app.seller(), "P-1", 100, 5).await;
    let alice = app.token("alice", Role::Customer);
    let bob = app.token("bob", Role::Customer);
    assert_eq!(
        app.put_in_cart(&alice, product["id"].as_str().unwrap(), 3)
            .await
            .status(),
        200
    );
    let bobs: Value = app
        .get("/api/v1/cart", Some(&bob))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bobs["items"], json!([]));
    assert_problem(app.get("/api/v1/cart", None).await, 401, "unauthorized").await;
    assert_problem(
        app.get("/api/v1/cart", Some(&app.seller())).await,
        403,
        "forbidden",
    )
    .await;

    // The query port checkout will use answers the same as the API.
    let port = app
        .runtime()
        .ports
        .get::<dyn CartQueries>()
        .expect("cart offers its port");
    let port: Arc<dyn CartQueries> = port;
    let snapshot = port.snapshot("alice", &Default::default()).await.unwrap();
    assert_eq!(snapshot.lines.len(), 1);
    assert_eq!(snapshot.lines[0].quantity, 3);
    assert_eq!(snapshot.total.unwrap().amount_minor, 300);
    assert!(
        port.snapshot("bob", &Default::default())
            .await
            .unwrap()
            .lines
            .is_empty()
    );
    app.stop().await;
}

on_both_backends!(
    a_cart_is_priced_from_catalog_events,
    one_currency_per_cart_and_bad_quantities_are_refused,
    each_customer_sees_only_their_own_cart,
);
