use kernel::auth::Role;
use serde_json::Value;

use crate::helpers::{TestDatabase, assert_problem, spawn_app, spawn_modules};
use crate::on_both_backends;

async fn health_metrics_and_the_api_description_are_served(db: TestDatabase) {
    let app = spawn_app(db).await;
    assert_eq!(app.get("/health/live", None).await.status(), 200);
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    for module in ["catalog", "cart", "checkout", "notification", "delivery"] {
        assert_eq!(ready["modules"][module]["migrated"], true, "{ready}");
        assert_eq!(ready["modules"][module]["database"], "up", "{ready}");
    }

    let product = app.create_product(&app.seller(), "METRIC-1", 100, 1).await;
    let path = format!(
        "/api/v1/catalog/products/{}",
        product["id"].as_str().unwrap()
    );
    assert_eq!(app.get(&path, None).await.status(), 200);
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains(r#"colony_lookups_total{module="catalog",lookup="products"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"colony_lookup_rounds_total{module="catalog",lookup="products"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"colony_http_requests_total{module="catalog",method="POST",route="/api/v1/catalog/products",status="201"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"colony_outbox_last_sequence{module="catalog"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"colony_dead_letters{module="catalog"} 0"#),
        "{metrics}"
    );

    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/api/v1/catalog/products",
        "/api/v1/catalog/products/{id}",
        "/health/ready",
        "/api/v1/admin/dead-letters",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let docs = app.get("/api/docs/", None).await;
    assert_eq!(docs.status(), 200);
    assert!(
        docs.text().await.unwrap().contains("swagger"),
        "Swagger UI page"
    );
    app.stop().await;
}

async fn operators_see_modules_and_dead_letters(db: TestDatabase) {
    let app = spawn_app(db).await;
    let seller = app.seller();
    assert_problem(
        app.get("/api/v1/admin/modules", Some(&seller)).await,
        403,
        "forbidden",
    )
    .await;
    assert_problem(
        app.get("/api/v1/admin/dead-letters", None).await,
        401,
        "unauthorized",
    )
    .await;

    let admin = app.admin();
    let modules: Value = app
        .get("/api/v1/admin/modules", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    let items = modules["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|m| m["status"] == "ready"), "{modules}");

    let letters: Value = app
        .get("/api/v1/admin/dead-letters", Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters["items"], serde_json::json!([]));
    let res = app
        .get("/api/v1/admin/dead-letters?module=billing", Some(&admin))
        .await;
    assert_problem(res, 404, "module_not_local").await;
    let res = app
        .post(
            "/api/v1/admin/dead-letters/nope/replay",
            Some(&admin),
            &serde_json::json!({}),
        )
        .await;
    assert_problem(res, 404, "dead_letter_not_found").await;
    let customer = app.token("c-1", Role::Customer);
    let res = app
        .post(
            "/api/v1/admin/dead-letters/nope/replay",
            Some(&customer),
            &serde_json::json!({}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
    app.stop().await;
}

async fn a_process_runs_only_the_modules_it_is_given(db: TestDatabase) {
    let specs = colony::registry::select(Some("catalog")).unwrap();
    let app = spawn_modules(db, specs).await;
    let ready: Value = app.get("/health/ready", None).await.json().await.unwrap();
    let modules: Vec<&String> = ready["modules"].as_object().unwrap().keys().collect();
    assert_eq!(modules, vec!["catalog"]);
    app.create_product(&app.seller(), "SOLO-1", 100, 1).await;
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/api/v1/catalog/products"].is_object());
    app.stop().await;
}

on_both_backends!(
    health_metrics_and_the_api_description_are_served,
    operators_see_modules_and_dead_letters,
    a_process_runs_only_the_modules_it_is_given,
);
