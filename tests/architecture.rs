//! The boundaries the architecture promises, checked mechanically: in the build
//! graph (no business module depends on another) and in the database (a module's
//! role cannot read another module's schema).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic to fail"
)]

use std::collections::BTreeMap;
use std::process::Command;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use kernel::testing::TestDatabase;
use serde_json::Value;

const BUSINESS: [&str; 5] = ["catalog", "cart", "checkout", "notification", "delivery"];

/// Each workspace package and the names of the packages it depends on.
fn workspace_dependencies() -> BTreeMap<String, Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

fn crate_of(module: &str) -> String {
    format!("colony-{module}")
}

#[test]
fn no_business_module_depends_on_another() {
    let graph = workspace_dependencies();
    let business: Vec<String> = BUSINESS.iter().map(|m| crate_of(m)).collect();
    for module in &business {
        let deps = graph
            .get(module)
            .unwrap_or_else(|| panic!("{module} is not in the workspace"));
        for dep in deps {
            assert!(
                !business.contains(dep),
                "{module} depends on {dep}: modules talk through events and ports in contracts"
            );
        }
        assert!(
            deps.contains(&"colony-kernel".to_string()),
            "{module} is wired through the kernel"
        );
    }
}

#[test]
fn kernel_and_contracts_know_no_business_module() {
    let graph = workspace_dependencies();
    for shared in ["colony-kernel", "colony-contracts"] {
        for dep in &graph[shared] {
            assert!(
                !BUSINESS.iter().any(|m| crate_of(m) == *dep),
                "{shared} depends on the business module {dep}"
            );
        }
    }
    for forbidden in ["diesel", "actix-web", "colony-kernel"] {
        assert!(
            !graph["colony-contracts"].iter().any(|d| d == forbidden),
            "contracts must stay free of {forbidden}"
        );
    }
}

#[test]
fn only_the_root_package_wires_modules_together() {
    let graph = workspace_dependencies();
    for (package, deps) in &graph {
        let modules_used = deps
            .iter()
            .filter(|d| BUSINESS.iter().any(|m| crate_of(m) == **d))
            .count();
        if package != "colony" {
            assert_eq!(modules_used, 0, "{package} depends on business modules");
        }
    }
}

#[test]
fn postgres_is_configured_when_ci_runs() {
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        assert!(
            std::env::var(kernel::testing::POSTGRES_ENV).is_ok_and(|v| !v.is_empty()),
            "CI must provide {}: PostgreSQL tests may not be skipped there",
            kernel::testing::POSTGRES_ENV
        );
    }
}

#[test]
fn a_module_role_cannot_read_another_modules_schema() {
    let Some(db) = TestDatabase::postgres() else {
        eprintln!("skipped: {} is not set", kernel::testing::POSTGRES_ENV);
        return;
    };
    let mut settings = colony::settings::Settings::built_in().unwrap();
    settings.database.url = db.url();
    for spec in colony::registry::select(Some("catalog,cart")).unwrap() {
        colony::runtime::open_database(&settings, &spec, true).unwrap();
    }
    // Connect the way the cart module does: as its own role.
    let url = db.url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let mut cart =
        PgConnection::establish(&format!("{scheme}://colony_cart@{host_and_db}")).unwrap();
    cart.batch_execute("SET search_path TO cart").unwrap();
    cart.batch_execute("CREATE TABLE cart_owned (id INT)")
        .expect("a module creates tables in its own schema");

    let read = cart.batch_execute("SELECT * FROM catalog.products");
    let error = read
        .expect_err("cart's role read catalog's table")
        .to_string();
    assert!(error.contains("permission denied"), "{error}");
    let write = cart.batch_execute("CREATE TABLE catalog.intruder (id INT)");
    assert!(
        write
            .expect_err("cart's role wrote into catalog")
            .to_string()
            .contains("permission denied")
    );
    let outbox = cart.batch_execute("SELECT * FROM catalog.colony_outbox");
    assert!(
        outbox.is_err(),
        "not even the outbox is readable across schemas"
    );
}
