//! How the composition root sees a business module: its name, migrations, routes,
//! event subscriptions and query ports. Nothing here names a module.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use actix_web::web;
use tokio::sync::watch;

use crate::bus::{BoxFuture, Consumer};
use crate::db::Db;
use crate::migrate::Migrations;

/// Static facts about a module, known before it is built.
#[derive(Clone, Copy)]
pub struct ModuleSpec {
    pub name: &'static str,
    pub migrations: Migrations,
    /// The modules whose events this one consumes (for the architecture graph).
    pub consumes: &'static [&'static str],
    /// Builds the running module from its context.
    pub build: fn(ModuleContext) -> anyhow::Result<Box<dyn Module>>,
}

/// What the composition root hands a module when building it.
pub struct ModuleContext {
    pub db: Db,
    /// The process's counters and histograms, rendered at `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The module's own section of `modules.<name>` (minus `database_url`), as JSON.
    pub settings: serde_json::Value,
}

impl ModuleContext {
    /// The module's settings as `T`, which should deny unknown fields.
    pub fn settings<T: serde::de::DeserializeOwned>(&self, module: &str) -> anyhow::Result<T> {
        serde_json::from_value(self.settings.clone())
            .map_err(|e| anyhow::anyhow!("modules.{module}: {e}"))
    }
}

/// A running business module.
pub trait Module: Send + Sync {
    fn name(&self) -> &'static str;

    /// Registers the module's HTTP routes (full paths, under `/api/v1/`); `ports`
    /// holds the query ports of other modules it may call.
    fn routes(&self, cfg: &mut web::ServiceConfig, ports: &Ports);

    /// The events this module consumes, one entry per source module.
    fn consumers(&self) -> Vec<Consumer> {
        Vec::new()
    }

    /// Background work of the module (payment steps, a simulated carrier, …), run
    /// until `shutdown` turns true. `ports` holds every port of this process.
    fn tasks(
        &self,
        _ports: &Ports,
        _shutdown: watch::Receiver<bool>,
    ) -> Vec<BoxFuture<'static, ()>> {
        Vec::new()
    }

    /// Offers the query ports this module implements to other modules.
    fn provide_ports(&self, _ports: &mut Ports) {}

    /// The OpenAPI description of the module's routes.
    fn openapi(&self) -> utoipa::openapi::OpenApi;
}

/// Query ports, by trait object type: `ports.get::<dyn CartQueries>()`.
#[derive(Default, Clone)]
pub struct Ports {
    ports: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Ports {
    /// Offers `port` as the implementation of `P` (e.g. `Arc<dyn CartQueries>`).
    pub fn provide<P: ?Sized + Send + Sync + 'static>(&mut self, port: Arc<P>) {
        self.ports.insert(TypeId::of::<P>(), Arc::new(port));
    }

    /// The implementation of `P`, if a module (or a remote adapter) provides one.
    pub fn get<P: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<P>> {
        self.ports
            .get(&TypeId::of::<P>())
            .and_then(|p| p.downcast_ref::<Arc<P>>())
            .cloned()
    }
}
