//! Opening the local modules: each one's database (provisioned and migrated),
//! the module itself, and the bus that connects them.

use std::sync::Arc;

use anyhow::Context;
use contracts::cart::CartQueries;
use kernel::Db;
use kernel::bus::{LocalTransport, NatsTransport, Transport};
use kernel::db::{self, Location, PoolOptions};
use kernel::metrics::Metrics;
use kernel::migrate;
use kernel::module::{Module, ModuleContext, ModuleSpec, Ports};

use crate::settings::{Settings, TransportKind};

/// A module running in this process.
pub struct LocalModule {
    pub spec: ModuleSpec,
    pub db: Db,
    pub module: Arc<dyn Module>,
}

/// Everything the server and the operators' endpoints share.
pub struct Runtime {
    pub modules: Vec<LocalModule>,
    pub transport: Arc<dyn Transport>,
    /// The NATS transport, when it carries the events (its relays publish outboxes).
    pub nats: Option<Arc<NatsTransport>>,
    pub metrics: Arc<Metrics>,
    pub ports: Ports,
}

impl Runtime {
    pub fn module(&self, name: &str) -> Option<&LocalModule> {
        self.modules.iter().find(|m| m.spec.name == name)
    }
}

fn pool_options(settings: &Settings) -> PoolOptions {
    PoolOptions {
        max_size: settings.database.pool_size.max(2),
        sqlite_synchronous: settings.database.sqlite_synchronous.clone(),
        ..PoolOptions::default()
    }
}

/// Connects `spec`'s database (creating schema and role on PostgreSQL) and, when
/// `apply_migrations`, applies its pending migrations. Blocking.
pub fn open_database(
    settings: &Settings,
    spec: &ModuleSpec,
    apply_migrations: bool,
) -> anyhow::Result<Db> {
    let url = settings.database_url_of(spec.name)?;
    let location = Location::resolve(&url, spec.name)?;
    let options = pool_options(settings);
    let connector = db::prepare(&location, &options)
        .with_context(|| format!("preparing the {} database", spec.name))?;
    let pool = db::pool(connector, &options)
        .with_context(|| format!("connecting the {} database", spec.name))?;
    if apply_migrations {
        let mut conn = pool.get()?;
        let applied = migrate::run_pending(&mut conn, spec.name, spec.migrations)
            .with_context(|| format!("migrating {}", spec.name))?;
        for name in applied {
            tracing::info!(module = spec.name, migration = %name, "migration applied");
        }
    }
    Ok(Db::new(spec.name, location.backend(), pool))
}

/// Opens, migrates and builds `specs`, and the transport between them.
pub async fn start(settings: &Settings, specs: &[ModuleSpec]) -> anyhow::Result<Runtime> {
    let metrics = Arc::new(Metrics::default());
    let mut modules = Vec::new();
    for spec in specs {
        let (s, sp) = (settings.clone(), *spec);
        let db = tokio::task::spawn_blocking(move || open_database(&s, &sp, true)).await??;
        let module: Arc<dyn Module> = Arc::from((spec.build)(ModuleContext {
            db: db.clone(),
            metrics: metrics.clone(),
            settings: settings.module_settings(spec.name),
        })?);
        modules.push(LocalModule {
            spec: *spec,
            db,
            module,
        });
    }
    let (transport, nats): (Arc<dyn Transport>, _) = match settings.bus.transport {
        TransportKind::Local => {
            let mut local = LocalTransport::new();
            for m in &modules {
                local.add_source(m.db.clone());
            }
            (Arc::new(local), None)
        }
        TransportKind::Nats => {
            let nats = Arc::new(
                NatsTransport::connect(&settings.bus.nats_url, &settings.bus.nats_prefix)
                    .await
                    .with_context(|| format!("connecting to NATS at {}", settings.bus.nats_url))?,
            );
            for m in &modules {
                nats.ensure_stream(m.spec.name)
                    .await
                    .with_context(|| format!("creating the {} stream", m.spec.name))?;
            }
            (nats.clone() as Arc<dyn Transport>, Some(nats))
        }
    };
    let mut ports = Ports::default();
    for m in &modules {
        m.module.provide_ports(&mut ports);
    }
    // Ports of modules that run elsewhere are HTTP adapters.
    let is_local = |name: &str| modules.iter().any(|m| m.spec.name == name);
    if let Some(cart) = settings.remote.get("cart").filter(|_| !is_local("cart")) {
        let port: Arc<dyn CartQueries> = Arc::new(crate::remote::RemoteCart::new(cart)?);
        ports.provide(port);
    }
    Ok(Runtime {
        modules,
        transport,
        nats,
        metrics,
        ports,
    })
}
