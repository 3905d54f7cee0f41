//! The same story in the split shape: every module its own process (checkout
//! twice), NATS JetStream between them, nginx in front, PostgreSQL behind —
//! started by `deploy/split.sh`, exactly as a user would.

use std::process::Command;
use std::time::{Duration, Instant};

use kernel::auth::Role;
use serde_json::Value;

use crate::helpers::{TestApp, TestDatabase, assert_problem, eventually, eventually_within};
use crate::story::whole_story;

const SECRET: &str = "split-topology-test-secret-0123456789abcdef";

/// Whether PostgreSQL, NATS and nginx are all here; in CI their absence fails.
fn services() -> Option<String> {
    let nats = std::env::var("COLONY_TEST_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let postgres = std::env::var(kernel::testing::POSTGRES_ENV).is_ok_and(|u| !u.is_empty());
    let nginx = Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    match (nats, postgres, nginx) {
        (Some(nats), true, true) => Some(nats),
        missing => {
            assert!(
                !in_ci,
                "CI must provide PostgreSQL, NATS and nginx: {missing:?}"
            );
            eprintln!("skipped: the split topology needs PostgreSQL, NATS and nginx");
            None
        }
    }
}

/// Seven consecutive free ports: the proxy's and one per process. They are taken
/// below Linux's range of ephemeral ports (32768 and up), where the source port of
/// any outgoing connection made meanwhile (to PostgreSQL, say) could take one of
/// them between this check and the process binding it.
fn free_ports() -> u16 {
    for _ in 0..50 {
        let base = 20_000 + (rand_u16() % 12_700);
        if (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no seven free consecutive ports");
}

/// The random low bits of a UUIDv7: tests that start at the same moment get
/// different values (the clock's nanoseconds need not differ).
fn rand_u16() -> u16 {
    uuid::Uuid::now_v7().as_u128() as u16
}

/// A running split topology; stopped when dropped, even when the test fails.
struct Topology {
    run_dir: tempfile::TempDir,
    database_url: String,
    nats_url: String,
    prefix: String,
    base: u16,
}

impl Topology {
    fn script(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new("deploy/split.sh")
            .args(args)
            .env("COLONY_BIN", env!("CARGO_BIN_EXE_colony"))
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("NATS_PREFIX", &self.prefix)
            .env("RUN_DIR", self.run_dir.path())
            .env("BASE_PORT", self.base.to_string())
            .env("JWT_SECRET", SECRET)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap()
    }

    fn start(db: &TestDatabase, nats_url: String) -> Self {
        let topology = Topology {
            run_dir: tempfile::tempdir().unwrap(),
            database_url: db.url(),
            nats_url,
            prefix: format!("t{}", uuid::Uuid::now_v7().simple()),
            base: free_ports(),
        };
        assert!(
            topology.script(&["start"]).success(),
            "the split topology did not start"
        );
        topology
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.base)
    }

    fn kill(&self, name: &str) {
        assert!(self.script(&["kill", name]).success());
    }

    fn revive(&self, name: &str) {
        assert!(
            self.script(&["revive", name]).success(),
            "{name} did not come back"
        );
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_story_runs_in_the_split_topology() {
    let Some(nats_url) = services() else { return };
    let db = TestDatabase::postgres().expect("PostgreSQL is configured");
    let topology = Topology::start(&db, nats_url);
    let app = TestApp::external(topology.address(), SECRET, db);
    whole_story(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_in_the_split_topology_lose_nothing() {
    let Some(nats_url) = services() else { return };
    let db = TestDatabase::postgres().expect("PostgreSQL is configured");
    let topology = Topology::start(&db, nats_url);
    let app = TestApp::external(topology.address(), SECRET, db);
    let tea = app.create_product(&app.seller(), "FAULT-1", 300, 100).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut customers = Vec::new();
    for i in 0..3 {
        let customer = app.token(&format!("fault-{i}"), Role::Customer);
        assert_eq!(app.put_in_cart(&customer, &tea, 1).await.status(), 200);
        customers.push(customer);
    }

    // Notification down: orders are still placed and confirmed.
    topology.kill("notification");
    let mut orders = Vec::new();
    for customer in &customers[..2] {
        let order: Value = app
            .place_order(customer, "k1", "tok_ok")
            .await
            .json()
            .await
            .unwrap();
        let id = order["id"].as_str().unwrap().to_string();
        app.order_in(customer, &id, "confirmed").await;
        orders.push((customer.clone(), id));
    }
    // Back again: every missed notification arrives, once.
    topology.revive("notification");
    for (customer, id) in &orders {
        let expected = vec![("order_confirmed".to_string(), id.clone())];
        eventually("the missed notification", || async {
            (app.notifications(customer).await == expected).then_some(())
        })
        .await;
    }

    // Cart down: placement answers 503 at once, naming cart; it recovers after.
    topology.kill("cart");
    let started = Instant::now();
    let res = app.place_order(&customers[2], "k2", "tok_ok").await;
    let problem = assert_problem(res, 503, "cart_unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(problem["detail"].as_str().unwrap().contains("cart"));
    topology.revive("cart");
    let order = eventually("placement to work again", || async {
        let res = app.place_order(&customers[2], "k3", "tok_ok").await;
        if res.status() == 202 {
            res.json::<Value>().await.ok()
        } else {
            None
        }
    })
    .await;
    app.order_in(&customers[2], order["id"].as_str().unwrap(), "confirmed")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_replica_killed_mid_burst_loses_and_doubles_nothing() {
    let Some(nats_url) = services() else { return };
    let db = TestDatabase::postgres().expect("PostgreSQL is configured");
    let topology = Topology::start(&db, nats_url);
    let app = TestApp::external(topology.address(), SECRET, db);
    let tea = app
        .create_product(&app.seller(), "BURST-1", 300, 1_000)
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut customers = Vec::new();
    for i in 0..12 {
        let customer = app.token(&format!("burst-{i}"), Role::Customer);
        assert_eq!(app.put_in_cart(&customer, &tea, 1).await.status(), 200);
        customers.push(customer);
    }
    // A burst through the proxy, one replica killed in the middle of it. Clients
    // retry with the same key until the placement is accepted, as they should.
    let place = |customer: String| {
        let app = &app;
        async move {
            eventually_within(
                Duration::from_secs(30),
                "the placement accepted",
                || async {
                    let res = app.place_order(&customer, "burst", "tok_ok").await;
                    if res.status() == 202 {
                        res.json::<Value>().await.ok()
                    } else {
                        None
                    }
                },
            )
            .await["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let burst = futures_util::future::join_all(customers.iter().cloned().map(place));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        topology.kill("checkout-1");
    };
    let (orders, ()) = tokio::join!(burst, killer);
    // The surviving replica takes everything over (claims of the dead one expire).
    for (customer, id) in customers.iter().zip(&orders) {
        app.order_in_within(
            std::time::Duration::from_secs(60),
            customer,
            id,
            "confirmed",
        )
        .await;
        assert_eq!(
            app.orders(customer).await.len(),
            1,
            "one order per customer"
        );
    }
    eventually_within(
        Duration::from_secs(30),
        "stock reserved once per order",
        || async { (app.product(&tea).await["stock"]["reserved"] == 12).then_some(()) },
    )
    .await;
}

/// A NATS server of this test's own (restarting CI's shared one would disturb
/// other tests), with JetStream storing to `dir`.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start(self.port, &self.dir.clone());
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_burst_loses_and_doubles_nothing() {
    if services().is_none() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut nats = OwnNats::start(port, store.path());
    let db = TestDatabase::postgres().expect("PostgreSQL is configured");
    let topology = Topology::start(&db, format!("nats://127.0.0.1:{port}"));
    let app = TestApp::external(topology.address(), SECRET, db);
    let tea = app
        .create_product(&app.seller(), "NATS-1", 300, 1_000)
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut customers = Vec::new();
    for i in 0..10 {
        let customer = app.token(&format!("restart-{i}"), Role::Customer);
        assert_eq!(app.put_in_cart(&customer, &tea, 1).await.status(), 200);
        customers.push(customer);
    }
    let mut orders = Vec::new();
    for (i, customer) in customers.iter().enumerate() {
        if i == 4 {
            nats.restart();
        }
        let order: Value = app
            .place_order(customer, "k", "tok_ok")
            .await
            .json()
            .await
            .unwrap();
        orders.push(order["id"].as_str().unwrap().to_string());
    }
    for (customer, id) in customers.iter().zip(&orders) {
        app.order_in_within(
            std::time::Duration::from_secs(60),
            customer,
            id,
            "confirmed",
        )
        .await;
        let expected = vec![("order_confirmed".to_string(), id.clone())];
        eventually_within(Duration::from_secs(60), "one notification", || async {
            (app.notifications(customer).await == expected).then_some(())
        })
        .await;
    }
    assert_eq!(
        app.product(&tea).await["stock"]["reserved"],
        10,
        "reserved once per order"
    );
}
