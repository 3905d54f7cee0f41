//! Configuration: built-in defaults < `config/default.toml` < the file named by
//! `COLONY_CONFIG` < environment `COLONY__SECTION__KEY`. Unknown keys are errors.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use config::{Config, Environment as EnvSource, File, FileFormat};
use kernel::auth::DEVELOPMENT_SECRET;
use kernel::bus::RetryPolicy;
use serde::Deserialize;

const BUILT_IN: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environment: Environment,
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    /// `modules.<name>`: `database_url` and the module's own keys.
    #[serde(default)]
    pub modules: BTreeMap<String, serde_json::Value>,
    pub bus: BusSettings,
    #[serde(default)]
    pub remote: BTreeMap<String, RemoteSettings>,
    pub auth: AuthSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    pub workers: usize,
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: u32,
    pub sqlite_synchronous: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    Local,
    Nats,
}

/// The shortest time handled events are kept.
pub const MIN_RETENTION_HOURS: u64 = 24;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSettings {
    pub transport: TransportKind,
    pub nats_url: String,
    pub nats_prefix: String,
    pub batch_size: usize,
    pub poll_interval_ms: u64,
    /// Milliseconds a consumer off the saga's path waits after a wake-up before
    /// its pass (`Consumer::prompt`).
    pub linger_ms: u64,
    pub max_attempts: i32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Hours an event stays in the outbox and inbox once every reader passed it.
    pub retention_hours: u64,
    /// Seconds between two pruning rounds of a module.
    pub prune_interval_secs: u64,
}

impl BusSettings {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            base_delay: Duration::from_millis(self.retry_base_ms),
            max_delay: Duration::from_millis(self.retry_max_ms.max(self.retry_base_ms)),
            batch_size: self.batch_size.max(1),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(10)),
            linger: Duration::from_millis(self.linger_ms),
        }
    }

    /// How long handled events are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.saturating_mul(3600))
    }

    pub fn prune_interval(&self) -> Duration {
        Duration::from_secs(self.prune_interval_secs.max(1))
    }
}

/// A module that runs in another process: where, and how patiently to call it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSettings {
    pub url: String,
    /// Longest wait for one call.
    #[serde(default = "default_remote_timeout_ms")]
    pub timeout_ms: u64,
    /// Further tries of an idempotent call that failed on the way (not on a 4xx).
    #[serde(default = "default_remote_retries")]
    pub retries: u32,
    /// Consecutive failed calls that open the circuit, and how long it stays open.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
}

fn default_remote_timeout_ms() -> u64 {
    2_000
}

fn default_remote_retries() -> u32 {
    2
}

fn default_breaker_failures() -> u32 {
    5
}

fn default_breaker_cooldown_ms() -> u64 {
    5_000
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_secret: String,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthSettings { jwt_secret: *** }")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

impl Settings {
    /// Loads every layer from the process environment and working directory.
    pub fn load() -> anyhow::Result<Self> {
        let file = std::env::var("COLONY_CONFIG").ok();
        Self::load_layers(
            Path::new("config/default.toml"),
            file.as_deref().map(Path::new),
            None,
        )
    }

    /// The built-in defaults alone (tests start from these).
    pub fn built_in() -> anyhow::Result<Self> {
        let settings: Self = Config::builder()
            .add_source(File::from_str(BUILT_IN, FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        Ok(settings)
    }

    /// Loads the layers; `env` replaces the process environment when given.
    pub fn load_layers(
        local_defaults: &Path,
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> anyhow::Result<Self> {
        let mut builder = Config::builder()
            .add_source(File::from_str(BUILT_IN, FileFormat::Toml))
            .add_source(
                File::from(local_defaults)
                    .format(FileFormat::Toml)
                    .required(false),
            );
        if let Some(file) = file {
            builder = builder.add_source(File::from(file).required(true));
        }
        let settings: Self = builder
            .add_source(
                EnvSource::with_prefix("COLONY")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(env),
            )
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    /// Rules serde cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.environment == Environment::Production {
            if self.auth.jwt_secret == DEVELOPMENT_SECRET {
                bail!(
                    "auth.jwt_secret is the development secret; set COLONY__AUTH__JWT_SECRET for production"
                );
            }
            if self.auth.jwt_secret.len() < 32 {
                bail!("auth.jwt_secret must be at least 32 characters in production");
            }
        }
        if self.bus.retention_hours < MIN_RETENTION_HOURS {
            // An inbox record is what makes an event delivered again a no-op: over
            // NATS, one whose acknowledgement was lost comes again whenever a
            // replica next pulls, however long that takes.
            bail!("bus.retention_hours must be at least {MIN_RETENTION_HOURS}");
        }
        for name in self.modules.keys() {
            if !crate::registry::is_module(name) {
                bail!(
                    "modules.{name}: no such module ({})",
                    crate::registry::names().join(", ")
                );
            }
        }
        for name in self.remote.keys() {
            if !crate::registry::is_module(name) {
                bail!(
                    "remote.{name}: no such module ({})",
                    crate::registry::names().join(", ")
                );
            }
        }
        Ok(())
    }

    /// The database URL of `module`: its own override or the shared one.
    pub fn database_url_of(&self, module: &str) -> anyhow::Result<String> {
        match self.modules.get(module).and_then(|m| m.get("database_url")) {
            None => Ok(self.database.url.clone()),
            Some(serde_json::Value::String(url)) => Ok(url.clone()),
            Some(other) => bail!("modules.{module}.database_url must be a string, got {other}"),
        }
    }

    /// The module's own settings, without `database_url`.
    pub fn module_settings(&self, module: &str) -> serde_json::Value {
        let mut section = self
            .modules
            .get(module)
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(map) = section.as_object_mut() {
            map.remove("database_url");
        }
        section
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn built_in_defaults_listen_locally_on_sqlite() {
        let s = Settings::load_layers(Path::new("/nonexistent"), None, env(&[])).unwrap();
        assert_eq!((s.http.host.as_str(), s.http.port), ("127.0.0.1", 8080));
        assert_eq!(s.database.url, "sqlite://data");
        assert_eq!(s.bus.transport, TransportKind::Local);
    }

    #[test]
    fn environment_overrides_files() {
        let s = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[
                ("COLONY__HTTP__PORT", "9001"),
                (
                    "COLONY__MODULES__CHECKOUT__DATABASE_URL",
                    "sqlite:///tmp/x.db",
                ),
                ("COLONY__BUS__TRANSPORT", "nats"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.port, 9001);
        assert_eq!(s.bus.transport, TransportKind::Nats);
        assert_eq!(s.database_url_of("checkout").unwrap(), "sqlite:///tmp/x.db");
        assert_eq!(s.database_url_of("cart").unwrap(), "sqlite://data");
    }

    #[test]
    fn unknown_keys_and_modules_are_errors() {
        let err = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[("COLONY__HTTP__PROT", "1")]),
        );
        assert!(err.is_err());
        let err = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[("COLONY__MODULES__BILLING__DATABASE_URL", "sqlite://x")]),
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("no such module"));
    }

    #[test]
    fn events_are_kept_a_week_and_at_least_a_day() {
        let s = Settings::load_layers(Path::new("/nonexistent"), None, env(&[])).unwrap();
        assert_eq!(s.bus.retention(), Duration::from_secs(7 * 24 * 3600));
        let err = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[("COLONY__BUS__RETENTION_HOURS", "23")]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("retention_hours must be at least 24"));
    }

    #[test]
    fn production_refuses_the_development_secret() {
        let err = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[("COLONY__ENVIRONMENT", "production")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("development secret"));
        let ok = Settings::load_layers(
            Path::new("/nonexistent"),
            None,
            env(&[
                ("COLONY__ENVIRONMENT", "production"),
                (
                    "COLONY__AUTH__JWT_SECRET",
                    "a-production-secret-of-enough-length-000",
                ),
            ]),
        );
        assert!(ok.is_ok());
    }
}
