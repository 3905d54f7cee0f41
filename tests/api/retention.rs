//! What is kept and for how long: idempotency keys expire after their retention,
//! and pruning the event machinery leaves the application working, never taking
//! an event a consumer has yet to read.

use std::time::Duration;

use colony::registry;
use colony::startup::{inboxes, outbox_readers};
use diesel::prelude::*;
use kernel::auth::Role;
use kernel::bus::retention::{self, Readers};
use serde_json::Value;

use crate::helpers::{TestApp, TestDatabase, spawn_app, spawn_modules};
use crate::on_both_backends;

diesel::table! {
    idempotency_keys (customer_id, idempotency_key) {
        customer_id -> Text,
        idempotency_key -> Text,
        created_at -> Timestamp,
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// Fills the customer's cart with one `product`, places an order with `key` and
/// waits for it to be confirmed (which empties the cart again).
async fn confirmed_order(app: &TestApp, customer: &str, product: &str, key: &str) -> String {
    assert_eq!(app.put_in_cart(customer, product, 1).await.status(), 200);
    let res = app.place_order(customer, key, "tok_ok").await;
    assert_eq!(res.status(), 202);
    let order = id(&res.json().await.unwrap());
    app.order_in(customer, &order, "confirmed").await;
    order
}

async fn an_expired_idempotency_key_places_a_new_order(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-7", 450, 50).await);
    let erin = app.token("erin", Role::Customer);
    let frank = app.token("frank", Role::Customer);
    let first = confirmed_order(&app, &erin, &tea, "weekly").await;
    let franks = confirmed_order(&app, &frank, &tea, "weekly").await;

    // Erin's key was stored three days ago; Frank's just now.
    let checkout = app.runtime().module("checkout").unwrap().db.clone();
    let three_days_ago = kernel::time::now() - chrono::Duration::hours(72);
    checkout
        .write_one(move |conn| {
            diesel::update(idempotency_keys::table.filter(idempotency_keys::customer_id.eq("erin")))
                .set(idempotency_keys::created_at.eq(three_days_ago))
                .execute(conn)
                .map_err(kernel::db::DbError::from)
        })
        .await
        .unwrap();
    let expired = checkout::expire_idempotency_keys(&checkout, Duration::from_secs(48 * 3600))
        .await
        .unwrap();
    assert_eq!(expired, 1);

    // The expired key places a new order; the kept one still replays.
    assert_eq!(app.put_in_cart(&erin, &tea, 1).await.status(), 200);
    let res = app.place_order(&erin, "weekly", "tok_ok").await;
    assert_eq!(res.status(), 202);
    assert!(res.headers().get("idempotent-replayed").is_none());
    let second = id(&res.json().await.unwrap());
    assert_ne!(second, first);
    app.order_in(&erin, &second, "confirmed").await;
    let res = app.place_order(&frank, "weekly", "tok_ok").await;
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(id(&res.json().await.unwrap()), franks);
    app.stop().await;
}

/// One pruning round of every local module, of everything older than `before`.
async fn prune_all(app: &TestApp, before: chrono::NaiveDateTime) -> retention::Pruned {
    let runtime = app.runtime();
    let mut total = retention::Pruned::default();
    for m in &runtime.modules {
        let readers = outbox_readers(runtime, m.spec.name);
        let pruned = retention::prune(&m.db, &readers, &inboxes(m), before)
            .await
            .unwrap();
        total.outbox += pruned.outbox;
        total.inbox += pruned.inbox;
    }
    total
}

async fn pruning_leaves_the_application_working(db: TestDatabase) {
    let app = spawn_app(db).await;
    let tea = id(&app.create_product(&app.seller(), "TEA-8", 450, 50).await);
    let gina = app.token("gina", Role::Customer);
    let first = confirmed_order(&app, &gina, &tea, "one").await;

    // Within the retention nothing goes.
    let within = prune_all(&app, kernel::time::now() - chrono::Duration::hours(1)).await;
    assert_eq!(within, retention::Pruned::default());
    // Past it, what every consumer read goes.
    let pruned = prune_all(&app, kernel::time::now() + chrono::Duration::hours(1)).await;
    assert!(pruned.outbox > 0 && pruned.inbox > 0, "{pruned:?}");

    // The saga goes on: a second order is settled, with its notifications.
    let second = confirmed_order(&app, &gina, &tea, "two").await;
    assert_ne!(first, second);
    let product = app.product(&tea).await;
    assert_eq!(product["stock"]["reserved"], 2, "{product}");
    // Each order's confirmation reached notification once, the first one's too
    // (its consumer may have trailed when the round ran).
    crate::helpers::eventually("both orders' notifications", || async {
        let n = app.notifications(&gina).await;
        let confirmed = |order: &str| {
            n.iter()
                .filter(|(kind, id)| kind == "order_confirmed" && id == order)
                .count()
        };
        (confirmed(&first) == 1 && confirmed(&second) == 1).then_some(())
    })
    .await;
    app.stop().await;
}

/// Over the local transport a module's outbox is the log its consumers read: it is
/// pruned only when every module that consumes it runs in this process.
async fn an_outbox_with_readers_elsewhere_is_kept(db: TestDatabase) {
    let specs: Vec<_> = registry::ALL
        .iter()
        .filter(|s| ["catalog", "cart", "checkout"].contains(&s.name))
        .copied()
        .collect();
    let app = spawn_modules(db, specs).await;
    let runtime = app.runtime();
    // Delivery and notification read checkout's events and run elsewhere.
    assert!(matches!(
        outbox_readers(runtime, "checkout"),
        Readers::Unknown
    ));
    // Cart and checkout read catalog's, and both run here.
    match outbox_readers(runtime, "catalog") {
        Readers::Consumers(readers) => {
            let mut names: Vec<_> = readers.iter().map(|(name, _)| *name).collect();
            names.sort_unstable();
            assert_eq!(names, ["cart", "checkout"]);
        }
        _ => panic!("catalog's readers all run here"),
    }
    let tea = id(&app.create_product(&app.seller(), "TEA-9", 450, 50).await);
    let hana = app.token("hana", Role::Customer);
    confirmed_order(&app, &hana, &tea, "k").await;
    let checkout = app.runtime().module("checkout").unwrap().db.clone();
    let rows = || {
        checkout.read(|conn| {
            kernel::schema::colony_outbox::table
                .count()
                .get_result::<i64>(conn)
                .map_err(kernel::db::DbError::from)
        })
    };
    let before = rows().await.unwrap();
    assert!(before >= 2, "placed and confirmed");
    prune_all(&app, kernel::time::now() + chrono::Duration::hours(1)).await;
    assert_eq!(
        rows().await.unwrap(),
        before,
        "checkout's events wait for delivery and notification"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_kept_less_than_a_day_are_refused_at_start() {
    let db = TestDatabase::sqlite();
    let mut settings = crate::helpers::test_settings(&db);
    settings.modules.insert(
        "checkout".into(),
        serde_json::json!({ "idempotency_key_hours": 12 }),
    );
    let Err(err) = colony::startup::Application::build(settings, registry::ALL.to_vec()).await
    else {
        panic!("a key kept 12 h breaks the contract's 24 h");
    };
    assert!(
        format!("{err:#}").contains("idempotency_key_hours must be at least 24"),
        "{err:#}"
    );
}

on_both_backends!(
    an_expired_idempotency_key_places_a_new_order,
    pruning_leaves_the_application_working,
    an_outbox_with_readers_elsewhere_is_kept,
);
