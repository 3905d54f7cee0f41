//! Two processes of the same binary: catalog and cart in one, checkout in the
//! other. Checkout reads the cart over HTTP with the customer's own token; when
//! the cart's process is down, placement answers 503 quickly, naming cart, and
//! recovers when it is back.

use std::time::{Duration, Instant};

use kernel::auth::Role;
use serde_json::{Value, json};

use crate::helpers::{TestDatabase, assert_problem, spawn_with};
use crate::on_both_backends;

async fn checkout_reads_a_remote_cart_and_fails_fast_without_it(db: TestDatabase) {
    let database_url = db.url();
    let shop = spawn_with(
        db,
        colony::registry::select(Some("catalog,cart")).unwrap(),
        |_| {},
    )
    .await;
    let cart_url = shop.address.clone();
    let port = cart_url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    // The same database (checkout's own file or schema in it), from another process.
    let checkout = spawn_with(TestDatabase::sqlite(), colony::registry::select(Some("checkout")).unwrap(), move |s| {
        s.database.url = database_url;
        s.remote.insert(
            "cart".into(),
            serde_json::from_value(json!({"url": cart_url, "timeout_ms": 500, "retries": 1, "breaker_failures": 2, "breaker_cooldown_ms": 300}))
                .unwrap(),
        );
    })
    .await;

    let tea = shop.create_product(&shop.seller(), "TEA-1", 450, 10).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let alice = shop.token("alice", Role::Customer);
    assert_eq!(shop.put_in_cart(&alice, &tea, 3).await.status(), 200);
    let res = checkout.place_order(&alice, "remote-1", "tok_ok").await;
    assert_eq!(res.status(), 202);
    let order: Value = res.json().await.unwrap();
    assert_eq!(
        order["total"],
        json!({"amount_minor": 1350, "currency": "EUR"}),
        "priced by the remote cart"
    );
    assert_eq!(order["items"][0]["quantity"], 3);
    // Another customer's token sees another (empty) cart through the same port.
    let bob = shop.token("bob", Role::Customer);
    assert_problem(
        checkout.place_order(&bob, "remote-2", "tok_ok").await,
        422,
        "empty_cart",
    )
    .await;

    // The cart's process goes away: a quick, clear 503 naming cart.
    let db = shop.stop().await;
    let started = Instant::now();
    let problem = assert_problem(
        checkout.place_order(&alice, "remote-3", "tok_ok").await,
        503,
        "cart_unavailable",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("cart"),
        "{problem}"
    );
    // With the circuit open, the answer comes at once.
    let started = Instant::now();
    assert_problem(
        checkout.place_order(&alice, "remote-4", "tok_ok").await,
        503,
        "cart_unavailable",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "took {:?}",
        started.elapsed()
    );

    // Back on the same port: placements work again once the breaker lets a call through.
    let shop = spawn_with(
        db,
        colony::registry::select(Some("catalog,cart")).unwrap(),
        move |s| {
            s.http.port = port;
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let res = checkout.place_order(&alice, "remote-5", "tok_ok").await;
    assert_eq!(res.status(), 202);
    shop.stop().await;
    checkout.stop().await;
}

on_both_backends!(checkout_reads_a_remote_cart_and_fails_fast_without_it);
