//! The same marketplace story with NATS JetStream carrying the events instead of
//! the in-process bus. Needs `COLONY_TEST_NATS_URL` (CI provides a server).

use kernel::auth::Role;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDatabase, eventually, spawn_with};
use crate::on_both_backends;

const NATS_ENV: &str = "COLONY_TEST_NATS_URL";

/// An application whose bus is NATS, on streams of its own.
async fn spawn_on_nats(db: TestDatabase) -> Option<TestApp> {
    let Some(url) = std::env::var(NATS_ENV).ok().filter(|u| !u.is_empty()) else {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(!in_ci, "CI must provide {NATS_ENV}");
        eprintln!("skipped: {NATS_ENV} is not set");
        return None;
    };
    let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
    Some(
        spawn_with(db, colony::registry::ALL.to_vec(), move |s| {
            s.bus.transport = colony::settings::TransportKind::Nats;
            s.bus.nats_url = url;
            s.bus.nats_prefix = prefix;
        })
        .await,
    )
}

async fn remove_streams(app: &TestApp) {
    if let Some(nats) = &app.runtime().nats {
        for module in colony::registry::names() {
            let _ = nats.delete_stream(module).await;
        }
    }
}

async fn the_story_runs_over_jetstream(db: TestDatabase) {
    let Some(app) = spawn_on_nats(db).await else {
        return;
    };
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    let tea = app.create_product(&app.seller(), "TEA-1", 450, 10).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let alice = app.token("alice", Role::Customer);
    assert_eq!(app.put_in_cart(&alice, &tea, 2).await.status(), 200);
    let order: Value = app
        .place_order(&alice, "nats-1", "tok_ok")
        .await
        .json()
        .await
        .unwrap();
    let order_id = order["id"].as_str().unwrap().to_string();
    app.order_in(&alice, &order_id, "confirmed").await;
    let shipment = app.shipment_of(&alice, &order_id).await;
    let path = format!(
        "/api/v1/delivery/shipments/{}",
        shipment["id"].as_str().unwrap()
    );
    assert_eq!(
        app.post(&format!("{path}/dispatch"), Some(&app.admin()), &json!({}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post(&format!("{path}/deliver"), Some(&app.admin()), &json!({}))
            .await
            .status(),
        200
    );
    app.order_in(&alice, &order_id, "fulfilled").await;
    let mut kinds: Vec<String> = eventually("three notifications", || async {
        let n = app.notifications(&alice).await;
        (n.len() >= 3).then_some(n)
    })
    .await
    .into_iter()
    .map(|(k, _)| k)
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
    eventually("stock committed", || async {
        (app.product(&tea).await["stock"] == json!({"on_hand": 8, "reserved": 0, "available": 8}))
            .then_some(())
    })
    .await;
    remove_streams(&app).await;
    app.stop().await;
}

on_both_backends!(the_story_runs_over_jetstream);
