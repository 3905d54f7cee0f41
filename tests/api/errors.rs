use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestDatabase, assert_problem, spawn_app};
use crate::on_both_backends;

async fn every_kind_of_bad_input_is_a_problem_and_writes_nothing(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    let url = format!("{}/api/v1/catalog/products", app.address);
    let valid = json!({"sku": "OK-1", "name": "Fine", "price": {"amount_minor": 100, "currency": "EUR"}, "stock": 1});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };

    // Bodies that are not JSON at all, or not sent as JSON.
    let raw_cases: Vec<(&str, &str, u16, &str)> = vec![
        ("{\"sku\": ", "application/json", 400, "malformed_json"),
        ("sku=OK-1", "application/json", 400, "malformed_json"),
        ("", "application/json", 400, "malformed_json"),
        (
            "{\"sku\":\"OK-1\"}",
            "text/plain",
            415,
            "unsupported_media_type",
        ),
    ];
    for (body, content_type, status, code) in raw_cases {
        let res = app
            .client
            .post(&url)
            .bearer_auth(&seller)
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_problem(res, status, code).await;
    }
    let huge = "x".repeat(70_000);
    let res = app
        .post(
            "/api/v1/catalog/products",
            Some(&seller),
            &with("description", json!(huge)),
        )
        .await;
    assert_problem(res, 413, "payload_too_large").await;

    // JSON that breaks the schema or a rule.
    let json_cases: Vec<(Value, u16, &str)> = vec![
        (without("sku"), 422, "invalid_body"),
        (without("price"), 422, "invalid_body"),
        (with("stock", json!("many")), 422, "invalid_body"),
        (with("price", json!(12.5)), 422, "invalid_body"),
        (
            with("price", json!({"amount_minor": 1.5, "currency": "EUR"})),
            422,
            "invalid_body",
        ),
        (with("colour", json!("red")), 422, "invalid_body"),
        (json!([1, 2]), 422, "invalid_body"),
        (
            with("price", json!({"amount_minor": -1, "currency": "EUR"})),
            422,
            "validation_failed",
        ),
        (
            with("price", json!({"amount_minor": 1, "currency": "euro"})),
            422,
            "validation_failed",
        ),
        (with("stock", json!(-3)), 422, "validation_failed"),
        (with("name", json!("   ")), 422, "validation_failed"),
        (with("sku", json!("has spaces")), 422, "validation_failed"),
        (with("sku", json!("")), 422, "validation_failed"),
    ];
    for (body, status, code) in json_cases {
        let res = app
            .post("/api/v1/catalog/products", Some(&seller), &body)
            .await;
        let problem = assert_problem(res, status, code).await;
        assert!(!problem["detail"].as_str().unwrap().is_empty());
    }

    // Paths and methods the API does not have.
    assert_problem(app.get("/api/v1/nowhere", None).await, 404, "not_found").await;
    assert_problem(
        app.get("/api/v1/catalog/products/not-a-uuid", None).await,
        404,
        "product_not_found",
    )
    .await;
    let unknown = format!("/api/v1/catalog/products/{}", uuid::Uuid::now_v7());
    assert_problem(app.get(&unknown, None).await, 404, "product_not_found").await;
    let res = app
        .request(
            Method::PUT,
            "/api/v1/catalog/products",
            Some(&seller),
            Some(&valid),
        )
        .await;
    assert_problem(res, 405, "method_not_allowed").await;
    let res = app
        .request(Method::DELETE, "/health/live", None, None)
        .await;
    assert_problem(res, 405, "method_not_allowed").await;

    let listed: Value = app
        .get("/api/v1/catalog/products", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["items"],
        json!([]),
        "no rejected request wrote a product"
    );
    assert_eq!(
        app.published("catalog").await,
        0,
        "no rejected request published an event"
    );
    app.stop().await;
}

on_both_backends!(every_kind_of_bad_input_is_a_problem_and_writes_nothing);
