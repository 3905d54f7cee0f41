//! The marketplace story through HTTP: list → cart → place → confirmed → cart
//! empty → shipment → dispatch → deliver → fulfilled, and the ways it can go else.

use futures_util::future::join_all;
use kernel::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDatabase, address, assert_problem, eventually, spawn_app};
use crate::on_both_backends;

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

async fn customer_with_cart(app: &TestApp, name: &str, items: &[(&str, i64)]) -> String {
    let token = app.token(name, Role::Customer);
    for (product, quantity) in items {
        assert_eq!(
            app.put_in_cart(&token, product, *quantity).await.status(),
            200
        );
    }
    token
}

async fn the_whole_story_from_listing_to_fulfilment(db: TestDatabase) {
    let app = spawn_app(db).await;
    whole_story(&app).await;
    app.stop().await;
}

/// The story, told to any colony: one process, or a split behind a proxy.
pub async fn whole_story(app: &TestApp) {
    let seller = app.seller();
    let admin = app.admin();
    let tea = id(&app
        .create_product(
            &seller,
            &format!("TEA-{}", uuid::Uuid::now_v7().simple()),
            450,
            10,
        )
        .await);
    let mug = id(&app
        .create_product(
            &seller,
            &format!("MUG-{}", uuid::Uuid::now_v7().simple()),
            1200,
            5,
        )
        .await);
    let alice = customer_with_cart(app, "alice", &[(&tea, 2), (&mug, 1)]).await;

    let res = app.place_order(&alice, "order-1", "tok_ok").await;
    assert_eq!(res.status(), 202);
    let placed: Value = res.json().await.unwrap();
    assert_eq!(placed["status"], "pending");
    assert_eq!(
        placed["total"],
        json!({"amount_minor": 2100, "currency": "EUR"})
    );
    let order_id = id(&placed);

    let confirmed = app.order_in(&alice, &order_id, "confirmed").await;
    assert_eq!(confirmed["items"].as_array().unwrap().len(), 2);
    eventually("the cart to empty", || async {
        let cart: Value = app
            .get("/api/v1/cart", Some(&alice))
            .await
            .json()
            .await
            .ok()?;
        (cart["items"] == json!([])).then_some(())
    })
    .await;
    let tea_stock = app.product(&tea).await["stock"].clone();
    assert_eq!(
        tea_stock,
        json!({"on_hand": 10, "reserved": 2, "available": 8})
    );

    let shipment = app.shipment_of(&alice, &order_id).await;
    assert_eq!(shipment["status"], "preparing");
    assert_eq!(shipment["address"]["city"], "London");
    let path = format!("/api/v1/delivery/shipments/{}", id(&shipment));
    let res = app
        .post(&format!("{path}/dispatch"), Some(&admin), &json!({}))
        .await;
    assert_eq!(res.status(), 200);
    eventually("stock to leave the warehouse", || async {
        let stock = app.product(&tea).await["stock"].clone();
        (stock == json!({"on_hand": 8, "reserved": 0, "available": 8})).then_some(())
    })
    .await;
    let res = app
        .post(&format!("{path}/deliver"), Some(&admin), &json!({}))
        .await;
    let delivered: Value = res.json().await.unwrap();
    let statuses: Vec<&str> = delivered["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["preparing", "dispatched", "delivered"]);
    app.order_in(&alice, &order_id, "fulfilled").await;

    let kinds = eventually("three notifications", || async {
        let n = app.notifications(&alice).await;
        (n.len() >= 3).then_some(n)
    })
    .await;
    let mut kinds: Vec<String> = kinds
        .into_iter()
        .map(|(k, o)| {
            assert_eq!(o, order_id);
            k
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "order_confirmed",
            "shipment_delivered",
            "shipment_dispatched"
        ]
    );
    assert_eq!(app.orders(&alice).await.len(), 1);
}

async fn a_declined_payment_releases_stock_and_keeps_the_cart(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 4).await);
    let bob = customer_with_cart(&app, "bob", &[(&tea, 3)]).await;
    let order_id = id(&app
        .place_order(&bob, "k1", "tok_decline")
        .await
        .json::<Value>()
        .await
        .unwrap());
    let rejected = app.order_in(&bob, &order_id, "rejected").await;
    assert_eq!(rejected["reason"], "payment_declined");
    eventually("the reservation released", || async {
        let stock = app.product(&tea).await["stock"].clone();
        (stock == json!({"on_hand": 4, "reserved": 0, "available": 4})).then_some(())
    })
    .await;
    let cart: Value = app
        .get("/api/v1/cart", Some(&bob))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        cart["items"][0]["quantity"], 3,
        "a rejected order leaves the cart as it was"
    );
    eventually("an order_rejected notification", || async {
        (app.notifications(&bob).await == vec![("order_rejected".to_string(), order_id.clone())])
            .then_some(())
    })
    .await;
    app.stop().await;
}

async fn an_order_beyond_the_stock_is_rejected_out_of_stock(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 1).await);
    let carol = customer_with_cart(&app, "carol", &[(&tea, 2)]).await;
    let order_id = id(&app
        .place_order(&carol, "k1", "tok_ok")
        .await
        .json::<Value>()
        .await
        .unwrap());
    let rejected = app.order_in(&carol, &order_id, "rejected").await;
    assert_eq!(rejected["reason"], "out_of_stock");
    assert_eq!(
        app.product(&tea).await["stock"],
        json!({"on_hand": 1, "reserved": 0, "available": 1})
    );
    app.stop().await;
}

async fn cancelling_before_dispatch_refunds_and_after_is_refused(db: TestDatabase) {
    let app = spawn_app(db).await;
    let admin = app.admin();
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 10).await);
    let dan = customer_with_cart(&app, "dan", &[(&tea, 2)]).await;
    let first = id(&app
        .place_order(&dan, "k1", "tok_ok")
        .await
        .json::<Value>()
        .await
        .unwrap());
    app.order_in(&dan, &first, "confirmed").await;
    app.shipment_of(&dan, &first).await;
    let cancel = format!("/api/v1/checkout/orders/{first}/cancel");
    let res = app.post(&cancel, Some(&dan), &json!({})).await;
    assert_eq!(res.status(), 202);
    let cancelled = app.order_in(&dan, &first, "cancelled").await;
    assert_eq!(cancelled["reason"], "cancelled_by_customer");
    eventually("stock back", || async {
        (app.product(&tea).await["stock"]["available"] == 10).then_some(())
    })
    .await;
    assert_eq!(
        app.post(&cancel, Some(&dan), &json!({})).await.status(),
        200,
        "cancelling twice is harmless"
    );
    let shipment = app.shipment_of(&dan, &first).await;
    assert_eq!(shipment["status"], "cancelled");
    let res = app
        .post(
            &format!("/api/v1/delivery/shipments/{}/dispatch", id(&shipment)),
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_problem(res, 409, "invalid_transition").await;

    assert_eq!(app.put_in_cart(&dan, &tea, 1).await.status(), 200);
    let second = id(&app
        .place_order(&dan, "k2", "tok_ok")
        .await
        .json::<Value>()
        .await
        .unwrap());
    app.order_in(&dan, &second, "confirmed").await;
    let shipment = app.shipment_of(&dan, &second).await;
    let res = app
        .post(
            &format!("/api/v1/delivery/shipments/{}/dispatch", id(&shipment)),
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    eventually("checkout to learn of the dispatch", || async {
        let res = app
            .post(
                &format!("/api/v1/checkout/orders/{second}/cancel"),
                Some(&dan),
                &json!({}),
            )
            .await;
        (res.status() == 409).then_some(())
    })
    .await;
    assert_eq!(
        app.order_in(&dan, &second, "confirmed").await["status"],
        "confirmed"
    );

    let kinds: Vec<String> = eventually("notifications", || async {
        let n = app.notifications(&dan).await;
        (n.len() >= 4).then_some(n)
    })
    .await
    .into_iter()
    .map(|(k, _)| k)
    .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "order_cancelled").count(), 1);
    app.stop().await;
}

/// Asserts that `res` answers a placement with order `order_id` again.
async fn assert_replayed(res: reqwest::Response, order_id: &str) {
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(id(&res.json::<Value>().await.unwrap()), order_id);
}

async fn placement_is_idempotent(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 50).await);
    let erin = customer_with_cart(&app, "erin", &[(&tea, 1)]).await;
    let first: Value = app
        .place_order(&erin, "same-key", "tok_ok")
        .await
        .json()
        .await
        .unwrap();
    let first = id(&first);
    assert_replayed(app.place_order(&erin, "same-key", "tok_ok").await, &first).await;
    assert_problem(
        app.place_order(&erin, "same-key", "tok_decline").await,
        422,
        "idempotency_key_reused",
    )
    .await;

    // Confirmed, the order emptied the cart: a retry that would be refused for an
    // empty cart (or for any other reason) is answered by the key first.
    app.order_in(&erin, &first, "confirmed").await;
    assert_replayed(app.place_order(&erin, "same-key", "tok_ok").await, &first).await;
    assert_problem(
        app.place_order(&erin, "same-key", "tok_bogus").await,
        422,
        "idempotency_key_reused",
    )
    .await;
    // With the cart filled again, the retry's key collides in the placing
    // transaction: the same order, and no second one.
    assert_eq!(app.put_in_cart(&erin, &tea, 2).await.status(), 200);
    assert_replayed(app.place_order(&erin, "same-key", "tok_ok").await, &first).await;
    assert_eq!(app.orders(&erin).await.len(), 1);

    let frank = customer_with_cart(&app, "frank", &[(&tea, 1)]).await;
    let attempts = join_all((0..8).map(|_| app.place_order(&frank, "burst", "tok_ok"))).await;
    let mut ids = Vec::new();
    for res in attempts {
        assert_eq!(res.status(), 202);
        ids.push(id(&res.json::<Value>().await.unwrap()));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "concurrent duplicates make one order");
    assert_eq!(app.orders(&frank).await.len(), 1);
    app.stop().await;
}

async fn bad_placements_are_refused_and_write_nothing(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 5).await);
    let gina = app.token("gina", Role::Customer);
    assert_problem(
        app.place_order(&gina, "k0", "tok_ok").await,
        422,
        "empty_cart",
    )
    .await;
    assert_eq!(app.put_in_cart(&gina, &tea, 1).await.status(), 200);
    assert_problem(
        app.place_order(&gina, "k1", "tok_bogus").await,
        422,
        "invalid_payment_token",
    )
    .await;
    let url = format!("{}/api/v1/checkout/orders", app.address);
    let res = app
        .client
        .post(&url)
        .bearer_auth(&gina)
        .json(&json!({"shipping_address": address(), "payment_token": "tok_ok"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "idempotency_key_required").await;
    let mut bad = address();
    bad["city"] = json!("  ");
    let res = app
        .client
        .post(&url)
        .bearer_auth(&gina)
        .header("Idempotency-Key", "k2")
        .json(&json!({"shipping_address": bad, "payment_token": "tok_ok"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .client
        .post(&url)
        .bearer_auth(&gina)
        .header("Idempotency-Key", "k3")
        .json(&json!({"payment_token": "tok_ok"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "invalid_body").await;
    assert_problem(
        app.place_order(&app.seller(), "k4", "tok_ok").await,
        403,
        "forbidden",
    )
    .await;
    assert!(
        app.orders(&gina).await.is_empty(),
        "no rejected placement wrote an order"
    );
    assert_eq!(app.published("checkout").await, 0);
    app.stop().await;
}

async fn customers_never_see_each_others_orders(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 5).await);
    let hana = customer_with_cart(&app, "hana", &[(&tea, 1)]).await;
    let ivan = app.token("ivan", Role::Customer);
    let order = id(&app
        .place_order(&hana, "k1", "tok_ok")
        .await
        .json::<Value>()
        .await
        .unwrap());
    app.order_in(&hana, &order, "confirmed").await;
    let shipment = id(&app.shipment_of(&hana, &order).await);

    assert_problem(
        app.get(&format!("/api/v1/checkout/orders/{order}"), Some(&ivan))
            .await,
        404,
        "order_not_found",
    )
    .await;
    let res = app
        .post(
            &format!("/api/v1/checkout/orders/{order}/cancel"),
            Some(&ivan),
            &json!({}),
        )
        .await;
    assert_problem(res, 404, "order_not_found").await;
    assert_problem(
        app.get(
            &format!("/api/v1/delivery/shipments/{shipment}"),
            Some(&ivan),
        )
        .await,
        404,
        "shipment_not_found",
    )
    .await;
    let theirs: Value = app
        .get(
            &format!("/api/v1/delivery/shipments?order_id={order}"),
            Some(&ivan),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["items"], json!([]));
    assert!(app.notifications(&ivan).await.is_empty());
    assert!(app.orders(&ivan).await.is_empty());
    let res = app
        .post(
            &format!("/api/v1/delivery/shipments/{shipment}/dispatch"),
            Some(&hana),
            &json!({}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    let res = app
        .request(
            Method::GET,
            &format!("/api/v1/checkout/orders/{order}"),
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(res.status(), 200, "an admin sees every order");
    app.stop().await;
}

async fn the_last_items_go_to_exactly_as_many_customers(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "LAST-1", 450, 3).await);
    let mut customers = Vec::new();
    for i in 0..8 {
        customers.push(customer_with_cart(&app, &format!("rush-{i}"), &[(&tea, 1)]).await);
    }
    let placed = join_all(
        customers
            .iter()
            .map(|c| app.place_order(c, "rush", "tok_ok")),
    )
    .await;
    let mut orders = Vec::new();
    for (res, customer) in placed.into_iter().zip(&customers) {
        assert_eq!(res.status(), 202);
        orders.push((customer.clone(), id(&res.json::<Value>().await.unwrap())));
    }
    let mut confirmed = 0;
    for (customer, order) in &orders {
        let settled = eventually("every order to settle", || async {
            let o: Value = app
                .get(&format!("/api/v1/checkout/orders/{order}"), Some(customer))
                .await
                .json()
                .await
                .ok()?;
            (o["status"] != "pending").then_some(o)
        })
        .await;
        match settled["status"].as_str().unwrap() {
            "confirmed" => confirmed += 1,
            "rejected" => assert_eq!(settled["reason"], "out_of_stock"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(confirmed, 3);
    assert_eq!(
        app.product(&tea).await["stock"],
        json!({"on_hand": 3, "reserved": 3, "available": 0})
    );
    app.stop().await;
}

async fn a_flaky_gateway_still_settles_every_order_once(db: TestDatabase) {
    let app = crate::helpers::spawn_with(db, colony::registry::ALL.to_vec(), |s| {
        s.modules.insert(
            "checkout".into(),
            json!({"payment": {
                "failure_rate": 0.5, "latency_ms": 5, "breaker_failures": 50,
                // Short waits between attempts: even ten failures in a row of one
                // order take well under a second.
                "retry_base_ms": 20, "retry_max_ms": 100
            }}),
        );
    })
    .await;
    let tea = id(&app.create_product(&app.seller(), "TEA-1", 450, 100).await);
    let mut orders = Vec::new();
    for i in 0..5 {
        let customer = customer_with_cart(&app, &format!("flaky-{i}"), &[(&tea, 2)]).await;
        let order = id(&app
            .place_order(&customer, "k", "tok_ok")
            .await
            .json::<Value>()
            .await
            .unwrap());
        orders.push((customer, order));
    }
    for (customer, order) in &orders {
        // Half the gateway calls fail: each order is retried until it goes through.
        app.order_in_within(
            std::time::Duration::from_secs(60),
            customer,
            order,
            "confirmed",
        )
        .await;
    }
    // Each order reserved once and charged once, whatever the retries.
    assert_eq!(app.product(&tea).await["stock"]["reserved"], 10);
    let confirmed = app.published("checkout").await;
    assert_eq!(confirmed, 10, "5 placed + 5 confirmed, no duplicates");
    app.stop().await;
}

on_both_backends!(
    the_whole_story_from_listing_to_fulfilment,
    a_declined_payment_releases_stock_and_keeps_the_cart,
    an_order_beyond_the_stock_is_rejected_out_of_stock,
    cancelling_before_dispatch_refunds_and_after_is_refused,
    placement_is_idempotent,
    bad_placements_are_refused_and_write_nothing,
    customers_never_see_each_others_orders,
    the_last_items_go_to_exactly_as_many_customers,
    a_flaky_gateway_still_settles_every_order_once,
);
