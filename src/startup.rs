//! The application: HTTP server plus event consumers of the local modules, built
//! from settings. `main` and the tests both start it through here.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::{ErrorHandlers, from_fn};
use actix_web::{App, HttpServer, web};
use kernel::auth::Authenticator;
use kernel::bus::ConsumerEngine;
use kernel::bus::retention::{self, Readers};
use kernel::error::{self, Problem};
use kernel::module::ModuleSpec;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa_swagger_ui::SwaggerUi;

use crate::runtime::{self, LocalModule, Runtime};
use crate::settings::Settings;
use crate::{admin, observe, ops};

pub struct Application {
    port: u16,
    server: Server,
    runtime: Arc<Runtime>,
    consumers: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl Application {
    /// Opens and migrates the modules, starts their consumers and binds the server
    /// (port 0 picks a free port).
    pub async fn build(settings: Settings, specs: Vec<ModuleSpec>) -> anyhow::Result<Self> {
        let runtime = Arc::new(runtime::start(&settings, &specs).await?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let consumers = start_consumers(&settings, &runtime, &shutdown_rx)?;

        let listener = TcpListener::bind((settings.http.host.as_str(), settings.http.port))?;
        let port = listener.local_addr()?.port();
        let authenticator = web::Data::new(Authenticator::new(&settings.auth.jwt_secret));
        let openapi = ops::openapi(&runtime);
        let shared = web::Data::from(runtime.clone());
        let metrics = web::Data::new(runtime.metrics.clone());
        let body_limit = settings.http.max_body_bytes;
        let mut server = HttpServer::new(move || {
            let mut app = App::new()
                .wrap(from_fn(observe::observe))
                .wrap(ErrorHandlers::new().default_handler(error::ensure_problem))
                .app_data(error::json_config(body_limit))
                .app_data(error::path_config())
                .app_data(error::query_config())
                .app_data(authenticator.clone())
                .app_data(shared.clone())
                .app_data(metrics.clone())
                .configure(ops::routes)
                .configure(admin::routes)
                .service(
                    SwaggerUi::new("/api/docs/{_:.*}").url("/api/openapi.json", openapi.clone()),
                );
            for m in &shared.modules {
                let (module, ports) = (m.module.clone(), shared.ports.clone());
                app = app.configure(move |cfg| module.routes(cfg, &ports));
            }
            app.default_service(web::to(|| async {
                Problem::not_found("not_found", "no resource at this path").to_response()
            }))
        })
        .shutdown_timeout(settings.http.shutdown_timeout_secs)
        .listen(listener)?;
        if settings.http.workers > 0 {
            server = server.workers(settings.http.workers);
        }
        Ok(Self {
            port,
            server: server.run(),
            runtime,
            consumers,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    /// Stops the server gracefully when called (tests; signals do the same).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT or `handle().stop()`: stops accepting, lets
    /// in-flight requests finish, then lets each consumer finish its pass.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        let _ = self.shutdown.send(true);
        for consumer in self.consumers {
            if tokio::time::timeout(Duration::from_secs(30), consumer)
                .await
                .is_err()
            {
                tracing::warn!("a consumer did not stop within 30 s");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn start_consumers(
    settings: &Settings,
    runtime: &Runtime,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let policy = settings.bus.retry_policy();
    let mut handles = Vec::new();
    for m in &runtime.modules {
        for consumer in m.module.consumers() {
            if !runtime.transport.reaches(consumer.source) {
                // Not lost: the events wait in the source's outbox for a process
                // (or transport) that can carry them.
                tracing::warn!(
                    consumer = consumer.name,
                    source = consumer.source,
                    transport = runtime.transport.name(),
                    "events of a module running elsewhere cannot reach this process over this transport"
                );
                continue;
            }
            let subscription = runtime
                .transport
                .subscribe(consumer.name, consumer.source)?;
            let engine = ConsumerEngine::new(
                consumer,
                m.db.clone(),
                policy.clone(),
                runtime.metrics.clone(),
            );
            handles.push(tokio::spawn(engine.run(subscription, shutdown.clone())));
        }
    }
    if let Some(nats) = &runtime.nats {
        for m in &runtime.modules {
            let (nats, db, stop) = (nats.clone(), m.db.clone(), shutdown.clone());
            let poll = policy.poll_interval;
            handles.push(tokio::spawn(
                async move { nats.relay(db, poll, stop).await },
            ));
        }
    }
    for m in &runtime.modules {
        handles.push(tokio::spawn(retention::run(
            m.db.clone(),
            outbox_readers(runtime, m.spec.name),
            inboxes(m),
            settings.bus.retention(),
            settings.bus.prune_interval(),
            shutdown.clone(),
        )));
        for task in m.module.tasks(&runtime.ports, shutdown.clone()) {
            handles.push(tokio::spawn(task));
        }
        handles.push(tokio::spawn(m.db.clone().checkpoints(shutdown.clone())));
    }
    Ok(handles)
}

/// The consumers whose inbox records `m`'s database holds.
pub fn inboxes(m: &LocalModule) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = m.module.consumers().iter().map(|c| c.name).collect();
    names.dedup();
    names
}

/// Who reads `module`'s outbox in this process's shape: the relay when a publishing
/// transport carries the events; otherwise the local consumers of its events, as
/// long as every module that consumes them runs here (one that runs elsewhere
/// cannot be asked where it stands, so nothing is pruned).
pub fn outbox_readers(runtime: &Runtime, module: &str) -> Readers {
    if runtime.nats.is_some() {
        return Readers::Relay;
    }
    let elsewhere = crate::registry::ALL
        .iter()
        .any(|spec| spec.consumes.contains(&module) && runtime.module(spec.name).is_none());
    if elsewhere {
        return Readers::Unknown;
    }
    Readers::Consumers(
        runtime
            .modules
            .iter()
            .flat_map(|m| {
                m.module
                    .consumers()
                    .into_iter()
                    .filter(|c| c.source == module)
                    .map(|c| (c.name, m.db.clone()))
                    .collect::<Vec<_>>()
            })
            .collect(),
    )
}
