//! Crash safety of the real binary: SIGKILL during a burst of placements (and
//! again while the saga settles them), restart, and every accepted order settles
//! exactly once with exact stock, one shipment and one notification.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;
use kernel::auth::{Authenticator, Role};
use serde_json::{Value, json};

use crate::helpers::{TestDatabase, address, eventually};
use crate::on_both_backends;

const SECRET: &str = "crash-test-secret-long-enough-0123456789";

struct Process {
    child: Child,
    base: String,
}

fn start(db: &TestDatabase, workdir: &std::path::Path) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_colony"))
        .arg("serve")
        .env("COLONY__HTTP__PORT", "0")
        .env("COLONY__DATABASE__URL", db.url())
        .env("COLONY__AUTH__JWT_SECRET", SECRET)
        .env("COLONY__LOG__FILTER", "error")
        .env("COLONY__BUS__POLL_INTERVAL_MS", "100")
        // A payment step claimed by a killed process is taken again after its lease
        // (twice the gateway timeout plus a second): keep it short here.
        .env("COLONY__MODULES__CHECKOUT__PAYMENT__TIMEOUT_MS", "1000")
        .current_dir(workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("colony starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Process { child, base }
}

fn kill(mut p: Process) {
    let _ = Command::new("kill")
        .args(["-KILL", &p.child.id().to_string()])
        .status();
    let _ = p.child.wait();
}

struct Client {
    http: reqwest::Client,
    auth: Authenticator,
}

impl Client {
    fn token(&self, subject: &str, role: Role) -> String {
        self.auth.issue(subject, role, Duration::from_secs(600))
    }

    async fn place(&self, base: &str, customer: &str) -> Option<String> {
        let res = self
            .http
            .post(format!("{base}/api/v1/checkout/orders"))
            .bearer_auth(self.token(customer, Role::Customer))
            .header("Idempotency-Key", format!("order-of-{customer}"))
            .json(&json!({"shipping_address": address(), "payment_token": "tok_ok"}))
            .send()
            .await
            .ok()?;
        if res.status() != 202 {
            return None;
        }
        res.json::<Value>().await.ok()?["id"]
            .as_str()
            .map(str::to_string)
    }

    async fn get(&self, url: String, token: &str) -> Option<Value> {
        self.http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
}

async fn every_accepted_order_settles_once_across_kills(db: TestDatabase) {
    let workdir = tempfile::tempdir().unwrap();
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        auth: Authenticator::new(SECRET),
    };
    let process = start(&db, workdir.path());
    let seller = client.token("seller-1", Role::Seller);
    let mut products = Vec::new();
    for (sku, price) in [("CRASH-A", 300), ("CRASH-B", 700)] {
        let res = client
            .http
            .post(format!("{}/api/v1/catalog/products", process.base))
            .bearer_auth(&seller)
            .json(&json!({"sku": sku, "name": sku, "price": {"amount_minor": price, "currency": "EUR"}, "stock": 500}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        products.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let customers: Vec<String> = (0..40).map(|i| format!("crash-{i}")).collect();
    for (i, customer) in customers.iter().enumerate() {
        let token = client.token(customer, Role::Customer);
        let product = &products[i % 2];
        let quantity = 1 + (i % 3) as i64;
        eventually("the cart to know the product", || async {
            let res = client
                .http
                .put(format!("{}/api/v1/cart/items/{product}", process.base))
                .bearer_auth(&token)
                .json(&json!({"quantity": quantity}))
                .send()
                .await
                .ok()?;
            (res.status() == 200).then_some(())
        })
        .await;
    }

    // A burst of placements, cut short by SIGKILL.
    let base = process.base.clone();
    let burst = join_all(customers.iter().map(|c| client.place(&base, c)));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        kill(process);
    };
    let (first_answers, ()) = tokio::join!(burst, killer);
    let accepted_before: Vec<(String, String)> = customers
        .iter()
        .zip(first_answers)
        .filter_map(|(c, id)| id.map(|id| (c.clone(), id)))
        .collect();

    // Restart; clients retry with the same keys; kill again while the saga runs.
    let process = start(&db, workdir.path());
    let retried = join_all(customers.iter().map(|c| client.place(&process.base, c))).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    kill(process);
    let process = start(&db, workdir.path());
    let mut orders = Vec::new();
    for (customer, id) in customers.iter().zip(retried) {
        let id = match id {
            Some(id) => id,
            None => client
                .place(&process.base, customer)
                .await
                .expect("placement after restart"),
        };
        orders.push((customer.clone(), id));
    }
    for (customer, id) in &accepted_before {
        let again = orders.iter().find(|(c, _)| c == customer).map(|(_, id)| id);
        assert_eq!(
            again,
            Some(id),
            "an order accepted before the crash is the one the key returns after it"
        );
    }

    let mut reserved_expected = [0_i64; 2];
    for (i, (customer, id)) in orders.iter().enumerate() {
        let token = client.token(customer, Role::Customer);
        let order = eventually("the order to settle", || async {
            let o = client
                .get(
                    format!("{}/api/v1/checkout/orders/{id}", process.base),
                    &token,
                )
                .await?;
            (o["status"] != "pending").then_some(o)
        })
        .await;
        assert_eq!(order["status"], "confirmed", "{order}");
        reserved_expected[i % 2] += 1 + (i % 3) as i64;
        let list = client
            .get(format!("{}/api/v1/checkout/orders", process.base), &token)
            .await
            .unwrap();
        assert_eq!(
            list["items"].as_array().unwrap().len(),
            1,
            "{customer} has exactly one order"
        );
        let shipments = eventually("one shipment", || async {
            let s = client
                .get(
                    format!("{}/api/v1/delivery/shipments?order_id={id}", process.base),
                    &token,
                )
                .await?;
            (!s["items"].as_array()?.is_empty()).then_some(s)
        })
        .await;
        assert_eq!(shipments["items"].as_array().unwrap().len(), 1);
        let notes = eventually("one notification", || async {
            let n = client
                .get(format!("{}/api/v1/notifications", process.base), &token)
                .await?;
            (!n["items"].as_array()?.is_empty()).then_some(n)
        })
        .await;
        let kinds: Vec<&str> = notes["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["order_confirmed"]);
    }
    for (product, expected) in products.iter().zip(reserved_expected) {
        let p = eventually("stock to settle", || async {
            let p = client
                .get(
                    format!("{}/api/v1/catalog/products/{product}", process.base),
                    "",
                )
                .await?;
            (p["stock"]["reserved"] == expected).then_some(p)
        })
        .await;
        assert_eq!(
            p["stock"],
            json!({"on_hand": 500, "reserved": expected, "available": 500 - expected})
        );
    }
    kill(process);
}

on_both_backends!(every_accepted_order_settles_once_across_kills);
