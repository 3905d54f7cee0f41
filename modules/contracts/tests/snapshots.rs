//! The published language is a promise: each event's JSON shape is kept in
//! `snapshots/<name>.json`, and a change to a published shape fails here. A
//! breaking change is a new event version (`…v2`) with a snapshot of its own; old
//! versions keep theirs as long as they exist.
//!
//! New events: run with `UPDATE_SNAPSHOTS=1` once to record their shape.

#![expect(clippy::unwrap_used, reason = "tests panic to fail")]

use std::collections::BTreeSet;
use std::path::PathBuf;

use colony_contracts::catalog::{
    PriceChanged, ProductDelisted, ProductDetailsChanged, ProductListed, ReservedLine,
    StockChanged, StockCommitted, StockReleased, StockReservationRejected, StockReserved,
};
use colony_contracts::checkout::{
    Address, CancellationRequested, OrderCancelled, OrderConfirmed, OrderFulfilled, OrderLine,
    OrderPlaced, OrderRejected,
};
use colony_contracts::delivery::{
    CancellationRefused, ShipmentCancelled, ShipmentCreated, ShipmentDelivered, ShipmentDispatched,
};
use colony_contracts::{Event, Money, all_event_names};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// One sample of every event, every optional field filled.
fn samples() -> Vec<(&'static str, Value)> {
    let id = Uuid::nil();
    fn sample<E: Event>(event: E) -> (&'static str, Value) {
        (E::NAME, serde_json::to_value(event).unwrap())
    }
    vec![
        sample(ProductListed {
            product_id: id,
            seller_id: "seller".into(),
            sku: "SKU".into(),
            name: "name".into(),
            description: Some("description".into()),
            price: Money::new(1, "EUR"),
            available: 1,
        }),
        sample(ProductDetailsChanged {
            product_id: id,
            name: "name".into(),
            description: Some("description".into()),
        }),
        sample(PriceChanged {
            product_id: id,
            old_price: Money::new(1, "EUR"),
            price: Money::new(2, "EUR"),
        }),
        sample(StockChanged {
            product_id: id,
            on_hand: 1,
            reserved: 0,
            available: 1,
        }),
        sample(ProductDelisted { product_id: id }),
        sample(StockReserved {
            order_id: id,
            lines: vec![ReservedLine {
                product_id: id,
                quantity: 1,
            }],
        }),
        sample(StockReservationRejected {
            order_id: id,
            reason: "out_of_stock".into(),
            product_ids: vec![id],
        }),
        sample(StockReleased { order_id: id }),
        sample(StockCommitted { order_id: id }),
        sample(OrderPlaced {
            order_id: id,
            customer_id: "c".into(),
            lines: vec![line()],
            total: Money::new(1, "EUR"),
            shipping_address: address(),
        }),
        sample(OrderConfirmed {
            order_id: id,
            customer_id: "c".into(),
            lines: vec![line()],
            total: Money::new(1, "EUR"),
            shipping_address: address(),
        }),
        sample(OrderRejected {
            order_id: id,
            customer_id: "c".into(),
            reason: "out_of_stock".into(),
        }),
        sample(CancellationRequested {
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(OrderCancelled {
            order_id: id,
            customer_id: "c".into(),
            reason: "cancelled_by_customer".into(),
        }),
        sample(OrderFulfilled {
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(ShipmentCreated {
            shipment_id: id,
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(ShipmentDispatched {
            shipment_id: id,
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(ShipmentDelivered {
            shipment_id: id,
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(ShipmentCancelled {
            shipment_id: id,
            order_id: id,
            customer_id: "c".into(),
        }),
        sample(CancellationRefused {
            shipment_id: id,
            order_id: id,
            customer_id: "c".into(),
            reason: "already_dispatched".into(),
        }),
    ]
}

fn line() -> OrderLine {
    OrderLine {
        product_id: Uuid::nil(),
        name: "name".into(),
        quantity: 1,
        unit_price: Money::new(1, "EUR"),
    }
}

fn address() -> Address {
    Address {
        name: "name".into(),
        line1: "line1".into(),
        city: "city".into(),
        postal_code: "postal".into(),
        country: "DE".into(),
    }
}

/// The type structure of a JSON value: field names and kinds, not values.
fn shape(value: &Value) -> Value {
    match value {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("boolean"),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!("integer"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(items) => json!([items.first().map(shape).unwrap_or(json!("empty"))]),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), shape(v)))
                .collect::<Map<_, _>>(),
        ),
    }
}

fn snapshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("snapshots")
}

#[test]
fn every_event_has_a_sample_and_a_well_formed_name() {
    let sampled: BTreeSet<&str> = samples().iter().map(|(n, _)| *n).collect();
    let declared: BTreeSet<&str> = all_event_names().into_iter().collect();
    assert_eq!(sampled, declared, "add a sample for each new event");
    for name in declared {
        let parts: Vec<&str> = name.split('.').collect();
        assert_eq!(parts.len(), 3, "{name} is not <module>.<event>.v<N>");
        assert!(
            parts[2].starts_with('v') && parts[2][1..].parse::<u32>().is_ok(),
            "{name}"
        );
    }
}

#[test]
fn published_event_shapes_do_not_change() {
    let update = std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, sample) in samples() {
        let path = snapshot_dir().join(format!("{name}.json"));
        let current = shape(&sample);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let recorded: Value = serde_json::from_str(&text).expect("snapshot is JSON");
                if recorded != current {
                    failures.push(format!(
                        "{name} changed shape: it was {recorded} and is now {current}. Consumers \
                         (and events already stored) rely on the old shape: publish a new \
                         version of the event instead"
                    ));
                }
            }
            Err(_) if update => {
                std::fs::create_dir_all(snapshot_dir()).unwrap();
                std::fs::write(&path, serde_json::to_string_pretty(&current).unwrap() + "\n").unwrap();
            }
            Err(_) => failures.push(format!(
                "{name} has no snapshot; record it with UPDATE_SNAPSHOTS=1 cargo test -p colony-contracts"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn no_published_version_disappears() {
    let declared: BTreeSet<String> = all_event_names().into_iter().map(String::from).collect();
    for entry in std::fs::read_dir(snapshot_dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let name = file.trim_end_matches(".json");
        assert!(
            declared.contains(name),
            "{name} was published and is gone: consumers may still receive it; keep it until none do"
        );
    }
}

#[test]
fn a_changed_shape_is_detected() {
    let before =
        shape(&json!({"product_id": "x", "price": {"amount_minor": 1, "currency": "EUR"}}));
    let renamed = shape(&json!({"product_id": "x", "price": {"amount": 1, "currency": "EUR"}}));
    let retyped =
        shape(&json!({"product_id": "x", "price": {"amount_minor": "1", "currency": "EUR"}}));
    assert_ne!(before, renamed);
    assert_ne!(before, retyped);
}
