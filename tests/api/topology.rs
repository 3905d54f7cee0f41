//! The same story in the split shape: every module its own process (checkout
//! twice), NATS JetStream between them, nginx in front, PostgreSQL behind —
//! started by `deploy/split.sh`, exactly as a user would.

use std::path::Path;
use std::process::Command;

use crate::helpers::{TestApp, TestDatabase};
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

/// Seven consecutive free ports: the proxy's and one per process.
fn free_ports() -> u16 {
    for _ in 0..50 {
        let base = 20_000 + (rand_u16() % 30_000);
        if (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no seven free consecutive ports");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id()) as u16
}

/// Stops the topology even when the test fails.
struct Topology<'a> {
    run_dir: &'a Path,
}

impl Drop for Topology<'_> {
    fn drop(&mut self) {
        let _ = Command::new("deploy/split.sh")
            .arg("stop")
            .env("RUN_DIR", self.run_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_story_runs_in_the_split_topology() {
    let Some(nats_url) = services() else { return };
    let db = TestDatabase::postgres().expect("PostgreSQL is configured");
    let run_dir = tempfile::tempdir().unwrap();
    let base = free_ports();
    let started = Command::new("deploy/split.sh")
        .arg("start")
        .env("COLONY_BIN", env!("CARGO_BIN_EXE_colony"))
        .env("DATABASE_URL", db.url())
        .env("NATS_URL", nats_url)
        .env("NATS_PREFIX", format!("t{}", uuid::Uuid::now_v7().simple()))
        .env("RUN_DIR", run_dir.path())
        .env("BASE_PORT", base.to_string())
        .env("JWT_SECRET", SECRET)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    let _topology = Topology {
        run_dir: run_dir.path(),
    };
    assert!(started.success(), "the split topology did not start");

    let app = TestApp::external(format!("http://127.0.0.1:{base}"), SECRET, db);
    whole_story(&app).await;
}
