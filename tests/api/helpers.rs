use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use colony::registry;
use colony::runtime::Runtime;
use colony::settings::Settings;
use colony::startup::Application;
use kernel::auth::{Authenticator, Role};
use kernel::module::ModuleSpec;
pub use kernel::testing::TestDatabase;
use reqwest::{Method, Response};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// The application in this process; `None` for one running elsewhere.
    runtime: Option<Arc<Runtime>>,
    auth: Authenticator,
    server: Option<(ServerHandle, JoinHandle<anyhow::Result<()>>)>,
    db: TestDatabase,
}

pub fn test_settings(db: &TestDatabase) -> Settings {
    let mut settings = Settings::built_in().expect("built-in settings");
    settings.http.port = 0;
    settings.http.workers = 2;
    settings.http.shutdown_timeout_secs = 5;
    settings.database.url = db.url();
    settings.database.pool_size = 4;
    settings.bus.poll_interval_ms = 100;
    settings.auth.jwt_secret = "a-test-secret-that-is-long-enough-0123456789".into();
    settings
}

/// Starts colony with every module on `db`.
pub async fn spawn_app(db: TestDatabase) -> TestApp {
    spawn_modules(db, registry::ALL.to_vec()).await
}

pub async fn spawn_modules(db: TestDatabase, specs: Vec<ModuleSpec>) -> TestApp {
    spawn_with(db, specs, |_| {}).await
}

/// Starts colony with `specs` on `db`, after `adjust` changed the test settings.
pub async fn spawn_with(
    db: TestDatabase,
    specs: Vec<ModuleSpec>,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = test_settings(&db);
    adjust(&mut settings);
    let auth = Authenticator::new(&settings.auth.jwt_secret);
    let app = Application::build(settings, specs)
        .await
        .expect("application starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let runtime = app.runtime();
    let handle = app.handle();
    let running = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        runtime: Some(runtime),
        auth,
        server: Some((handle, running)),
        db,
    }
}

impl TestApp {
    /// Colony running elsewhere (other processes), reached at `address`, signing
    /// tokens with `secret`.
    pub fn external(address: String, secret: &str, db: TestDatabase) -> Self {
        TestApp {
            address,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            runtime: None,
            auth: Authenticator::new(secret),
            server: None,
            db,
        }
    }

    /// The application's runtime (only for colony running in this process).
    pub fn runtime(&self) -> &Arc<Runtime> {
        self.runtime.as_ref().expect("colony runs in this process")
    }

    /// Stops the server gracefully and hands back its databases (for a restart).
    pub async fn stop(self) -> TestDatabase {
        if let Some((handle, running)) = self.server {
            handle.stop(true).await;
            running.await.expect("joined").expect("stopped cleanly");
        }
        drop(self.runtime);
        self.db
    }

    pub fn token(&self, subject: &str, role: Role) -> String {
        self.auth.issue(subject, role, Duration::from_secs(600))
    }

    pub fn seller(&self) -> String {
        self.token("seller-1", Role::Seller)
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", Role::Admin)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.address));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        req.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        self.request(Method::POST, path, token, Some(body)).await
    }

    /// Lists a product as `token`'s seller; panics unless it is created.
    pub async fn create_product(
        &self,
        token: &str,
        sku: &str,
        price_minor: i64,
        stock: i64,
    ) -> Value {
        let res = self
            .post(
                "/api/v1/catalog/products",
                Some(token),
                &json!({
                    "sku": sku,
                    "name": format!("Product {sku}"),
                    "description": "A fine thing",
                    "price": {"amount_minor": price_minor, "currency": "EUR"},
                    "stock": stock
                }),
            )
            .await;
        assert_eq!(res.status(), 201, "creating {sku}");
        res.json().await.expect("product json")
    }

    /// Events the module has published so far (its outbox head).
    pub async fn published(&self, module: &str) -> i64 {
        let res = self.get("/api/v1/admin/modules", Some(&self.admin())).await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("modules json");
        body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|m| m["module"] == module))
            .and_then(|m| m["bus"]["last_sequence"].as_i64())
            .unwrap_or_else(|| panic!("module {module} not listed: {body}"))
    }
}

/// Asserts that `res` is a problem document with `status` and `code`; returns it.
pub async fn assert_problem(res: Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for expected {code}");
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        content_type, "application/problem+json",
        "content type for {code}"
    );
    let body: Value = res.json().await.expect("problem json");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    for field in ["type", "title", "detail"] {
        assert!(body[field].is_string(), "problem lacks {field}: {body}");
    }
    body
}

impl TestApp {
    /// Puts `quantity` of `product_id` in the customer's cart, waiting (up to 10 s)
    /// for the cart to learn of the product from catalog's events.
    pub async fn put_in_cart(&self, customer: &str, product_id: &str, quantity: i64) -> Response {
        let path = format!("/api/v1/cart/items/{product_id}");
        let body = json!({ "quantity": quantity });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let res = self
                .request(Method::PUT, &path, Some(customer), Some(&body))
                .await;
            if res.status() != 404 || std::time::Instant::now() > deadline {
                return res;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most 10 s.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(10), what, check).await
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn address() -> Value {
    json!({"name": "Ada Lovelace", "line1": "12 St James's Square", "city": "London", "postal_code": "SW1Y 4JH", "country": "GB"})
}

impl TestApp {
    pub async fn place_order(&self, customer: &str, key: &str, token: &str) -> Response {
        self.client
            .post(format!("{}/api/v1/checkout/orders", self.address))
            .bearer_auth(customer)
            .header("Idempotency-Key", key)
            .json(&json!({"shipping_address": address(), "payment_token": token}))
            .send()
            .await
            .expect("request sent")
    }

    /// Waits until order `id` reaches `status`; returns it.
    pub async fn order_in(&self, customer: &str, id: &str, status: &str) -> Value {
        self.order_in_within(Duration::from_secs(10), customer, id, status)
            .await
    }

    /// Waits up to `limit` until order `id` reaches `status`; returns it.
    pub async fn order_in_within(
        &self,
        limit: Duration,
        customer: &str,
        id: &str,
        status: &str,
    ) -> Value {
        let path = format!("/api/v1/checkout/orders/{id}");
        eventually_within(limit, &format!("order {id} to be {status}"), || async {
            let order: Value = self.get(&path, Some(customer)).await.json().await.ok()?;
            (order["status"] == status).then_some(order)
        })
        .await
    }

    pub async fn product(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/catalog/products/{id}"), None)
            .await
            .json()
            .await
            .expect("product json")
    }

    /// The customer's orders (the first page of them).
    pub async fn orders(&self, customer: &str) -> Vec<Value> {
        let list: Value = self
            .get("/api/v1/checkout/orders", Some(customer))
            .await
            .json()
            .await
            .expect("orders json");
        list["items"].as_array().expect("items").clone()
    }

    /// The customer's notifications as (kind, order id) pairs.
    pub async fn notifications(&self, customer: &str) -> Vec<(String, String)> {
        let list: Value = self
            .get("/api/v1/notifications", Some(customer))
            .await
            .json()
            .await
            .expect("notifications json");
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|n| {
                (
                    n["kind"].as_str().unwrap_or_default().to_string(),
                    n["order_id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The shipment of an order, once delivery has opened it.
    pub async fn shipment_of(&self, customer: &str, order_id: &str) -> Value {
        let path = format!("/api/v1/delivery/shipments?order_id={order_id}");
        eventually(&format!("a shipment for {order_id}"), || async {
            let list: Value = self.get(&path, Some(customer)).await.json().await.ok()?;
            list["items"].as_array()?.first().cloned()
        })
        .await
    }
}
