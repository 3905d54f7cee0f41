//! The real binary: it prints where it listens, serves, and on SIGTERM stops
//! accepting, finishes what it was doing and exits 0, keeping what it committed.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic to fail"
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kernel::auth::{Authenticator, Role};

const SECRET: &str = "process-test-secret-long-enough-0123456789";

struct Colony {
    child: Child,
    address: String,
}

fn start(data_dir: &std::path::Path) -> Colony {
    let mut child = Command::new(env!("CARGO_BIN_EXE_colony"))
        .arg("serve")
        .env("COLONY__HTTP__PORT", "0")
        .env(
            "COLONY__DATABASE__URL",
            format!("sqlite://{}", data_dir.display()),
        )
        .env("COLONY__AUTH__JWT_SECRET", SECRET)
        .env("COLONY__LOG__FILTER", "warn")
        .current_dir(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("colony starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let address = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Colony { child, address }
}

fn terminate(mut colony: Colony) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &colony.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = colony.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "colony did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let colony = start(dir.path());
    let client = reqwest::Client::new();
    let token = Authenticator::new(SECRET).issue("seller-1", Role::Seller, Duration::from_secs(60));
    let res = client
        .post(format!("{}/api/v1/catalog/products", colony.address))
        .bearer_auth(&token)
        .json(&serde_json::json!({"sku": "P-1", "name": "Kept", "price": {"amount_minor": 5, "currency": "EUR"}, "stock": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        dir.path().join("catalog.db").exists(),
        "one SQLite file per module"
    );

    let status = terminate(colony);
    assert!(status.success(), "exit status {status:?}");

    let colony = start(dir.path());
    let listed: serde_json::Value = client
        .get(format!("{}/api/v1/catalog/products", colony.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["name"], "Kept");
    assert!(terminate(colony).success());
}

#[test]
fn production_refuses_the_development_secret() {
    let output = Command::new(env!("CARGO_BIN_EXE_colony"))
        .args(["token", "--subject", "x", "--role", "admin"])
        .env("COLONY__ENVIRONMENT", "production")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("development secret"));
}

#[test]
fn token_prints_a_token_the_server_accepts() {
    let output = Command::new(env!("CARGO_BIN_EXE_colony"))
        .args([
            "token",
            "--subject",
            "alice",
            "--role",
            "customer",
            "--ttl",
            "30m",
        ])
        .env("COLONY__AUTH__JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let claims = Authenticator::new(SECRET).verify(token.trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("alice", Role::Customer)
    );
    assert!((claims.exp - claims.iat - 1800).abs() <= 1);
}

/// CPU time (user + system) the process has used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn an_idle_process_sleeps() {
    let dir = tempfile::tempdir().unwrap();
    let colony = start(dir.path());
    let token = Authenticator::new(SECRET).issue("seller-1", Role::Seller, Duration::from_secs(60));
    // Some work first, so that every module has committed and been woken once.
    let res = reqwest::Client::new()
        .post(format!("{}/api/v1/catalog/products", colony.address))
        .bearer_auth(&token)
        .json(&serde_json::json!({"sku": "P-1", "name": "Idle", "price": {"amount_minor": 5, "currency": "EUR"}, "stock": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pid = colony.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    assert!(terminate(colony).success());
    // Clock ticks are 1/100 s: an idle process polls now and then and uses well
    // under a tenth of one core; a worker that wakes itself keeps a core busy.
    assert!(used < 30, "an idle process used {used} ticks of CPU in 3 s");
}
