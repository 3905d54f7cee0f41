//! Database access shared by every module: one connection type for SQLite and
//! PostgreSQL, pools that connect each module to its own file or schema, and the
//! write transaction every state change goes through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::{Connection, PgConnection, SqliteConnection};
use tokio::sync::watch;

use crate::envelope::Envelope;
use crate::outbox::Publications;

/// One connection type for both backends; queries written once run on either.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// Which database engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Picks the backend from the URL scheme (`sqlite://` or `postgres://`).
    pub fn of_url(url: &str) -> Result<Self, DbError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(DbError::Config(format!(
                "database url must start with sqlite:// or postgres://, got {:?}",
                redact(url)
            )))
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database configuration: {0}")]
    Config(String),
    #[error("could not connect to the database: {0}")]
    Connect(String),
    #[error("database pool: {0}")]
    Pool(#[from] r2d2::PoolError),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("background task failed: {0}")]
    Join(String),
    /// One failure answered to several callers (`lookup::Lookups`).
    #[error(transparent)]
    Shared(Arc<DbError>),
}

impl DbError {
    /// What a client is told: 503 while `module`'s database cannot be reached, else
    /// a logged 500 that reveals nothing of the database.
    pub fn problem(&self, module: &str) -> crate::Problem {
        match self {
            Self::Shared(e) => e.problem(module),
            Self::Pool(_) | Self::Connect(_) => crate::Problem::unavailable(
                "database_unavailable",
                format!("the {module} database is unavailable"),
            ),
            other => crate::Problem::internal(other),
        }
    }
}

/// Where one module's data lives, resolved from configuration.
#[derive(Debug, Clone)]
pub enum Location {
    /// A SQLite file of its own.
    SqliteFile(PathBuf),
    /// A PostgreSQL schema named after the module, reached through `admin_url` for
    /// provisioning and through the module's own role for everything else.
    PostgresSchema { admin_url: String, schema: String },
}

impl Location {
    /// Resolves `url` (`sqlite://DIR`, `sqlite://FILE.db` or `postgres://…`) for `module`.
    pub fn resolve(url: &str, module: &str) -> Result<Self, DbError> {
        match Backend::of_url(url)? {
            Backend::Sqlite => {
                let rest = url.trim_start_matches("sqlite:");
                let rest = rest.strip_prefix("//").unwrap_or(rest);
                if rest.is_empty() {
                    return Err(DbError::Config("sqlite url names no path".into()));
                }
                let path = PathBuf::from(rest);
                let is_file = path
                    .extension()
                    .is_some_and(|e| e == "db" || e == "sqlite" || e == "sqlite3");
                Ok(Self::SqliteFile(if is_file {
                    path
                } else {
                    path.join(format!("{module}.db"))
                }))
            }
            Backend::Postgres => Ok(Self::PostgresSchema {
                admin_url: url.to_string(),
                schema: module.to_string(),
            }),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::SqliteFile(_) => Backend::Sqlite,
            Self::PostgresSchema { .. } => Backend::Postgres,
        }
    }
}

/// Tuning of the pools.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_size: u32,
    pub connect_timeout: Duration,
    /// `PRAGMA synchronous` for SQLite: `NORMAL` (default) or `FULL`.
    pub sqlite_synchronous: String,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_size: 8,
            connect_timeout: Duration::from_secs(5),
            sqlite_synchronous: "NORMAL".into(),
        }
    }
}

/// Opens connections for one module: a SQLite file with WAL, or a PostgreSQL
/// session as the module's role with `search_path` set to its schema.
#[derive(Debug, Clone)]
pub struct ModuleConnector {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Sqlite { path: String, setup: String },
    Postgres { url: String, setup: String },
}

impl ModuleConnector {
    pub fn connect(&self) -> Result<AnyConnection, DbError> {
        match &self.target {
            Target::Sqlite { path, setup } => {
                let mut conn = SqliteConnection::establish(path)
                    .map_err(|e| DbError::Connect(format!("{path}: {e}")))?;
                conn.batch_execute(setup)?;
                Ok(AnyConnection::Sqlite(conn))
            }
            Target::Postgres { url, setup } => {
                let mut conn = PgConnection::establish(url)
                    .map_err(|e| DbError::Connect(format!("{}: {e}", redact(url))))?;
                conn.batch_execute(setup)?;
                Ok(AnyConnection::Postgresql(conn))
            }
        }
    }
}

impl ManageConnection for ModuleConnector {
    type Connection = AnyConnection;
    type Error = DbError;

    fn connect(&self) -> Result<AnyConnection, DbError> {
        ModuleConnector::connect(self)
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), DbError> {
        conn.batch_execute("SELECT 1").map_err(DbError::from)
    }

    /// A connection handed back inside a transaction (a panic unwound through its
    /// owner) is dropped rather than reused.
    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        match conn {
            AnyConnection::Sqlite(c) => !outside_transaction(c),
            AnyConnection::Postgresql(c) => !outside_transaction(c),
        }
    }
}

/// The PostgreSQL role that owns a module's schema.
pub fn role_name(schema: &str) -> String {
    format!("colony_{schema}")
}

/// Creates the module's role and schema if missing (idempotent, safe to race) and
/// returns a connector that logs in as that role.
pub fn prepare(location: &Location, options: &PoolOptions) -> Result<ModuleConnector, DbError> {
    match location {
        Location::SqliteFile(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    DbError::Config(format!(
                        "cannot create data directory {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            let sync = match options.sqlite_synchronous.to_ascii_uppercase().as_str() {
                s @ ("NORMAL" | "FULL" | "EXTRA" | "OFF") => s.to_string(),
                other => {
                    return Err(DbError::Config(format!(
                        "sqlite synchronous must be NORMAL or FULL, got {other:?}"
                    )));
                }
            };
            // busy_timeout first: switching to WAL needs the lock other connections may hold.
            // Checkpoints run beside the writers (`Db::checkpoints`); the automatic one,
            // run by a committing writer, bounds the log when writers outpace them.
            let setup = format!(
                "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                 PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; \
                 PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES};"
            );
            Ok(ModuleConnector {
                target: Target::Sqlite {
                    path: path.to_string_lossy().into_owned(),
                    setup,
                },
            })
        }
        Location::PostgresSchema { admin_url, schema } => {
            check_identifier(schema)?;
            let role = role_name(schema);
            let password = derived_password(admin_url, &role);
            let mut admin = PgConnection::establish(admin_url)
                .map_err(|e| DbError::Connect(format!("{}: {e}", redact(admin_url))))?;
            let password_clause = password
                .as_deref()
                .map(|p| format!(" PASSWORD '{p}'"))
                .unwrap_or_default();
            // Processes starting together (replicas, a split) take turns: catalog
            // updates of the same schema or role would otherwise fail with "tuple
            // concurrently updated". Roles are cluster-wide, so another database may
            // still create one first: that race is tolerated.
            admin.batch_execute(&format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(hashtext('colony.provision'));
                 DO $$ BEGIN
                   CREATE ROLE {role} LOGIN{password_clause};
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
                 END $$;
                 CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role};
                 REVOKE ALL ON SCHEMA public FROM {role};
                 COMMIT;"
            ))?;
            let url = with_credentials(admin_url, &role, password.as_deref())?;
            Ok(ModuleConnector {
                target: Target::Postgres {
                    url,
                    setup: format!(
                        "SET search_path TO {schema}; SET idle_in_transaction_session_timeout = '60s';"
                    ),
                },
            })
        }
    }
}

/// Builds the pool of one module.
pub fn pool(connector: ModuleConnector, options: &PoolOptions) -> Result<DbPool, DbError> {
    Pool::builder()
        .max_size(options.max_size)
        .min_idle(Some(1))
        // No `SELECT 1` before every use: a broken connection fails its statement,
        // the transaction is retried, and r2d2 replaces it.
        .test_on_check_out(false)
        .connection_timeout(options.connect_timeout)
        .build(connector)
        .map_err(DbError::from)
}

/// How often a SQLite module's write-ahead log is copied into its file: often
/// enough that at a moderate write rate the log is copied before it reaches
/// `AUTOCHECKPOINT_PAGES`.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Log pages after which a committing writer checkpoints itself (SQLite's own
/// default): it bounds the log when writers outpace `Db::checkpoints`, or when that
/// is not running. A longer log makes every read and write slower and the
/// checkpoint that finally comes longer (with 10 000 pages the event bus
/// benchmark's p99 rose from 8–11 ms to 13–45 ms).
const AUTOCHECKPOINT_PAGES: u32 = 1_000;

pub type DbPool = Pool<ModuleConnector>;
pub type PooledConn = PooledConnection<ModuleConnector>;

/// Commits' envelopes waiting for the relay, at most; past that, it reads them.
const HANDOFF_DEPTH: usize = 256;

/// Envelopes of recent commits kept for local readers (`Db::keep_recent`); a
/// reader further behind reads the outbox.
const RECENT: usize = 4096;

/// A panic while a lock was held leaves what it guards whole: keep using it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A reader of the outbox that wakes for some events only.
struct Listener {
    events: &'static [&'static str],
    tx: watch::Sender<Published>,
}

/// What the commits of this process told a reader of some events (see
/// `Db::publications_of`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// The highest sequence number of those events committed so far.
    pub up_to: i64,
    /// Counts the commits that did not say what they published
    /// (`Db::notify_committed`): after one, only a read of the outbox can tell.
    pub unknown: u64,
}

/// A module's handle on its own database: the pool plus the signals that wake
/// readers of its outbox when a transaction that published commits.
#[derive(Clone)]
pub struct Db {
    module: &'static str,
    backend: Backend,
    pool: DbPool,
    published: watch::Sender<u64>,
    /// Readers woken only by commits that published one of the events they name.
    listeners: Arc<std::sync::Mutex<Vec<Listener>>>,
    /// Where committed envelopes go to this module's relay, if one runs here.
    relay: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Sender<Vec<Envelope>>>>>,
    /// Publishing commits whose envelopes were not handed to a relay.
    unhanded: Arc<std::sync::atomic::AtomicU64>,
    /// The envelopes of this process's latest publishing commits, by number, once
    /// `keep_recent` was called: what local readers take instead of reading.
    recent: Arc<std::sync::Mutex<Option<BTreeMap<i64, Envelope>>>>,
    nudged: watch::Sender<u64>,
    /// SQLite has one writer per file: writers of this process queue here, in
    /// order, instead of in SQLite's busy handler, which sleeps up to 100 ms a try.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl Db {
    pub fn new(module: &'static str, backend: Backend, pool: DbPool) -> Self {
        Self {
            module,
            backend,
            pool,
            published: watch::Sender::new(0),
            listeners: Arc::default(),
            relay: Arc::default(),
            unhanded: Arc::default(),
            recent: Arc::default(),
            nudged: watch::Sender::new(0),
            writer: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn module(&self) -> &'static str {
        self.module
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// A receiver that changes whenever a write transaction of this module that
    /// published events commits: what readers of the whole outbox wait for.
    pub fn publications(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// A receiver that changes whenever a transaction of this module that published
    /// one of `events` commits (any event when `events` is empty), and says up to
    /// which sequence number they were published: what a consumer that acts on
    /// those only waits for. Commits of other events leave it asleep.
    pub fn publications_of(&self, events: &'static [&'static str]) -> watch::Receiver<Published> {
        let (tx, rx) = watch::channel(Published::default());
        lock(&self.listeners).push(Listener { events, tx });
        rx
    }

    /// Tells every reader that a transaction committed which may have published
    /// anything.
    pub fn notify_committed(&self) {
        self.forget_recent();
        self.unhanded
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.signal(|l| l.tx.send_modify(|p| p.unknown = p.unknown.wrapping_add(1)));
    }

    /// Tells readers that a transaction committed which published `published`
    /// (nothing: nobody is woken). Before the readers' signal, so that a reader
    /// woken by it finds them: keeps its envelopes for this process's readers
    /// (`committed_after`), and hands them to this module's relay if one runs here.
    pub fn announce(&self, published: Publications) {
        if published.is_empty() {
            return;
        }
        // Kept only when all are there, and this module's. Otherwise what was kept
        // goes: a reader must not take a run that stops short of this commit's
        // numbers, with nothing after them kept to tell it so.
        let complete = published.complete && !published.envelopes.is_empty();
        let keepable = complete
            && published
                .envelopes
                .iter()
                .all(|envelope| envelope.source == self.module);
        if keepable {
            if let Some(recent) = lock(&self.recent).as_mut() {
                for envelope in &published.envelopes {
                    recent.insert(envelope.sequence, envelope.clone());
                }
                while recent.len() > RECENT {
                    recent.pop_first();
                }
            }
        } else {
            self.forget_recent();
        }
        let handed = complete
            && lock(&self.relay)
                .as_ref()
                .is_some_and(|relay| relay.try_send(published.envelopes).is_ok());
        if !handed {
            self.unhanded
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.signal(|l| {
            let up_to = published
                .names
                .iter()
                .filter(|(name, _)| l.events.is_empty() || l.events.contains(name))
                .map(|(_, sequence)| *sequence)
                .max();
            if let Some(up_to) = up_to {
                l.tx.send_modify(|p| p.up_to = p.up_to.max(up_to));
            }
        });
    }

    /// Wakes the readers of the whole outbox, and tells each listener what `tell`
    /// says to; listeners whose receiver is gone are dropped.
    fn signal(&self, tell: impl Fn(&Listener)) {
        self.published.send_modify(|n| *n = n.wrapping_add(1));
        lock(&self.listeners).retain(|l| {
            tell(l);
            !l.tx.is_closed()
        });
    }

    /// For this module's relay: the envelopes of its publishing commits, in commit
    /// order, from now on (one relay per module and process).
    pub fn relay_handoff(&self) -> tokio::sync::mpsc::Receiver<Vec<Envelope>> {
        crate::outbox::keep_envelopes();
        let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF_DEPTH);
        *lock(&self.relay) = Some(tx);
        rx
    }

    /// A commit was not kept: readers read the outbox until new commits are kept.
    fn forget_recent(&self) {
        if let Some(recent) = lock(&self.recent).as_mut() {
            recent.clear();
        }
    }

    /// From now on, keeps the envelopes of this process's publishing commits (the
    /// latest `RECENT`) for readers in this process: see `committed_after`.
    pub fn keep_recent(&self) {
        crate::outbox::keep_envelopes();
        lock(&self.recent).get_or_insert_with(BTreeMap::new);
    }

    /// The events numbered `after + 1`, `after + 2`, … with none missing, at most
    /// `max`, as this process's commits kept them: what a read of the outbox after
    /// `after` returns, but for the events of other processes' commits, which a
    /// poll reads. `None` when a read is needed: the next number was not kept (a
    /// transaction still running, another process's), or the run stops at a
    /// missing number that a later kept one follows. (A commit of this process that
    /// kept nothing empties what was kept, so no run stops short of it unseen.)
    pub fn committed_after(&self, after: i64, max: usize) -> Option<Vec<Envelope>> {
        let recent = lock(&self.recent);
        let recent = recent.as_ref()?;
        let mut run = Vec::new();
        let mut next = after.checked_add(1)?;
        for (&sequence, envelope) in recent.range(next..) {
            if sequence != next || run.len() >= max {
                break;
            }
            run.push(envelope.clone());
            next += 1;
        }
        let beyond = recent
            .last_key_value()
            .is_some_and(|(&last, _)| last >= next);
        if run.is_empty() || (run.len() < max && beyond) {
            return None;
        }
        Some(run)
    }

    /// Whether a relay in this process takes this module's committed envelopes.
    pub fn relay_attached(&self) -> bool {
        lock(&self.relay).as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// How many publishing commits have not handed their envelopes to a relay
    /// (made before it ran, too many envelopes, its queue full, or commits that did
    /// not say what they published): a relay reads the outbox when this moves.
    pub fn unhanded(&self) -> u64 {
        self.unhanded.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A receiver that changes when this module's own consumers have new work
    /// (a dead letter replayed), as opposed to new events from a source.
    pub fn nudges(&self) -> watch::Receiver<u64> {
        self.nudged.subscribe()
    }

    pub fn nudge_consumers(&self) {
        self.nudged.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// This process's turn to write (SQLite only; PostgreSQL locks rows, not files).
    pub async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writer.clone().lock_owned().await),
            Backend::Postgres => None,
        }
    }

    /// Runs `f` in a write transaction on a pooled connection, off the async
    /// runtime, and once it has committed wakes the readers of this module's
    /// outbox if `f` published.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        self.write_announcing(f, false).await
    }

    /// As `write`, except that on PostgreSQL `f` runs outside an explicit
    /// transaction, saving the round trips of `BEGIN` and `COMMIT`: for a change
    /// that `f` writes there, its events included (`Publisher::publish_with`), with
    /// one statement, which commits or fails as a whole by itself. Every statement
    /// `f` runs on PostgreSQL commits on its own, so more than one would not be
    /// atomic. On SQLite, where statements cost no round trips, `f` runs in a write
    /// transaction as with `write`.
    pub async fn write_single<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        self.write_announcing(f, true).await
    }

    /// `write` and `write_single` (`single`): runs `f`, and wakes the readers of
    /// this module's outbox if what it published committed.
    async fn write_announcing<T, E, F>(&self, f: F, single: bool) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        let (result, published) = self
            .on_write_turn(move |conn| {
                crate::outbox::take_published();
                let (result, committed) = match conn {
                    // What a statement published, it committed, whatever `f` returns.
                    AnyConnection::Postgresql(_) if single => (f(conn), true),
                    _ => {
                        let result = write_tx(conn, f);
                        let committed = result.is_ok();
                        (result, committed)
                    }
                };
                let published = crate::outbox::take_published();
                Ok::<_, E>((result, committed.then_some(published)))
            })
            .await?;
        if let Some(published) = published {
            self.announce(published);
        }
        result
    }

    /// Runs `f` on a pooled connection outside any explicit transaction, off the
    /// async runtime: for a write that is one statement (which commits by itself),
    /// saving the round trips of `BEGIN` and `COMMIT`. Takes this process's write
    /// turn on SQLite. Never for publishing: an event is published in the
    /// transaction of its change.
    pub async fn write_one<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        self.on_write_turn(f).await
    }

    /// Runs `f` on a pooled connection off the async runtime, holding this
    /// process's write turn (SQLite) until it returns.
    async fn on_write_turn<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        let pool = self.pool.clone();
        let turn = self.write_turn().await;
        tokio::task::spawn_blocking(move || {
            let result = pool
                .get()
                .map_err(|e| DbError::from(e).into())
                .and_then(|mut conn| f(&mut conn));
            drop(turn);
            result
        })
        .await
        .map_err(|e| DbError::Join(e.to_string()))?
    }

    /// On SQLite, until `shutdown`: copies the write-ahead log into the database
    /// file every `CHECKPOINT_EVERY`, beside the writers (a passive checkpoint waits
    /// for no one and no one waits for it). Otherwise the writer whose commit fills
    /// the log does it, and every writer queued behind it waits for the file's sync.
    /// Returns at once on PostgreSQL.
    pub async fn checkpoints(self, mut shutdown: watch::Receiver<bool>) {
        if self.backend != Backend::Sqlite {
            return;
        }
        while !*shutdown.borrow() {
            tokio::select! {
                () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                _ = shutdown.changed() => break,
            }
            let pool = self.pool.clone();
            let done = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get().map_err(DbError::from)?;
                conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
                    .map_err(DbError::from)
            })
            .await;
            if let Ok(Err(e)) = done {
                tracing::warn!(module = self.module, error = %e, "checkpoint failed");
            }
        }
    }

    /// Runs a read-only `f` on a pooled connection, off the async runtime.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, E> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(DbError::from)?;
            f(&mut conn)
        })
        .await
        .map_err(|e| DbError::Join(e.to_string()))?
    }
}

type Hook = Box<dyn FnOnce()>;

thread_local! {
    /// What runs once the `write_tx` in progress on this thread commits.
    static AFTER_COMMIT: std::cell::RefCell<Option<Vec<Hook>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `hook` once the `write_tx` in progress on this thread has committed, and
/// never if it rolls back: for what must not happen unless the transaction's
/// changes are there (handing work to a task of this process, say). Hooks run on
/// this thread, in the order they were registered, right after the commit.
/// Outside a `write_tx` nothing is registered and `false` is returned.
pub fn after_commit(hook: impl FnOnce() + 'static) -> bool {
    AFTER_COMMIT.with(|hooks| match hooks.borrow_mut().as_mut() {
        Some(hooks) => {
            hooks.push(Box::new(hook));
            true
        }
        None => false,
    })
}

/// Whether a `write_tx` is in progress on this thread (so that `after_commit`
/// would register its hook).
pub fn in_write_tx() -> bool {
    AFTER_COMMIT.with(|hooks| hooks.borrow().is_some())
}

/// A mark in this thread's commit hooks, for a savepoint: hooks registered after
/// it are dropped by `forget_after_commit(mark)` when the savepoint rolls back.
pub fn after_commit_mark() -> usize {
    AFTER_COMMIT.with(|hooks| hooks.borrow().as_ref().map_or(0, Vec::len))
}

/// Drops the commit hooks registered since `mark` (their savepoint rolled back).
pub fn forget_after_commit(mark: usize) {
    AFTER_COMMIT.with(|hooks| {
        if let Some(hooks) = hooks.borrow_mut().as_mut() {
            hooks.truncate(mark);
        }
    });
}

/// Runs `f` in a transaction that holds the write lock from its first statement.
///
/// On SQLite a deferred transaction that reads first and writes later fails with
/// `SQLITE_BUSY` when another writer committed in between, so writes begin with
/// `BEGIN IMMEDIATE`. Nested `conn.transaction` calls inside `f` become savepoints.
/// Hooks registered with `after_commit` during `f` run after the commit. On
/// PostgreSQL, the events `f` publishes are appended to the outbox together, with
/// one statement, once `f` has returned (`outbox::Publisher::publish`).
pub fn write_tx<T, E, F>(conn: &mut AnyConnection, f: F) -> Result<T, E>
where
    E: From<diesel::result::Error>,
    F: FnOnce(&mut AnyConnection) -> Result<T, E>,
{
    let queue = match conn {
        AnyConnection::Sqlite(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?;
            None
        }
        AnyConnection::Postgresql(c) => {
            AnsiTransactionManager::begin_transaction(c)?;
            Some(crate::outbox::QueueScope::open(c))
        }
    };
    let scope = HookScope::open();
    type Manager = <AnyConnection as Connection>::TransactionManager;
    // The events `f` published are appended last, while its locks are still held.
    let result = f(conn).and_then(|value| match (&queue, &mut *conn) {
        (Some(queue), AnyConnection::Postgresql(c)) => {
            queue.flush(c).map(|()| value).map_err(E::from)
        }
        _ => Ok(value),
    });
    let result = match result {
        Ok(value) => match Manager::commit_transaction(conn) {
            Ok(()) => Ok(value),
            Err(commit_error) => {
                // A failed commit may leave the transaction open; close it before
                // handing the connection back to the pool.
                let _ = Manager::rollback_transaction(conn);
                Err(commit_error.into())
            }
        },
        Err(e) => Manager::rollback_transaction(conn)
            .map_err(E::from)
            .and(Err(e)),
    };
    if let Some(queue) = queue {
        queue.close(result.is_ok());
    }
    let hooks = scope.close();
    if result.is_ok() {
        for hook in hooks {
            hook();
        }
    }
    result
}

/// The commit hooks of one `write_tx`. The enclosing transaction's (another
/// connection's, on this thread) are set aside meanwhile and put back when it
/// closes, or when it is dropped on a panic.
struct HookScope {
    outer: Option<Option<Vec<Hook>>>,
}

impl HookScope {
    fn open() -> Self {
        let outer = AFTER_COMMIT.with(|hooks| hooks.replace(Some(Vec::new())));
        Self { outer: Some(outer) }
    }

    /// This transaction's hooks, in order.
    fn close(mut self) -> Vec<Hook> {
        let outer = self.outer.take().flatten();
        AFTER_COMMIT
            .with(|hooks| hooks.replace(outer))
            .unwrap_or_default()
    }
}

impl Drop for HookScope {
    fn drop(&mut self) {
        if let Some(outer) = self.outer.take() {
            AFTER_COMMIT.with(|hooks| hooks.replace(outer));
        }
    }
}

fn outside_transaction<C>(conn: &mut C) -> bool
where
    C: Connection<TransactionManager = AnsiTransactionManager>,
{
    matches!(
        AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth(),
        Ok(None)
    )
}

fn check_identifier(name: &str) -> Result<(), DbError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DbError::Config(format!(
            "{name:?} is not a valid schema name"
        )))
    }
}

/// Parts of a `postgres://user:password@host/db?params` URL.
struct PgUrl<'a> {
    scheme: &'a str,
    password: Option<&'a str>,
    rest: &'a str,
}

fn parse_pg_url(url: &str) -> Result<PgUrl<'_>, DbError> {
    let (scheme, after) = url
        .split_once("://")
        .ok_or_else(|| DbError::Config("postgres url lacks ://".into()))?;
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let (authority, _) = after.split_at(authority_end);
    let (userinfo, rest) = match authority.rfind('@') {
        Some(at) => (Some(&after[..at]), &after[at + 1..]),
        None => (None, after),
    };
    let password = userinfo.and_then(|u| u.split_once(':')).map(|(_, p)| p);
    Ok(PgUrl {
        scheme,
        password,
        rest,
    })
}

/// The admin URL with the module role's credentials in place of the admin's.
fn with_credentials(
    admin_url: &str,
    role: &str,
    password: Option<&str>,
) -> Result<String, DbError> {
    let url = parse_pg_url(admin_url)?;
    Ok(match password {
        Some(p) => format!("{}://{role}:{p}@{}", url.scheme, url.rest),
        None => format!("{}://{role}@{}", url.scheme, url.rest),
    })
}

/// A module role's password, derived from the admin password so that nothing has to
/// be stored: whoever holds the admin credentials could reset it anyway. Without an
/// admin password (trust or peer auth) the role gets none either.
fn derived_password(admin_url: &str, role: &str) -> Option<String> {
    use hmac::{Hmac, Mac};
    let admin_password = parse_pg_url(admin_url).ok()?.password?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(admin_password.as_bytes()).ok()?;
    mac.update(role.as_bytes());
    let digest = mac.finalize().into_bytes();
    Some(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match parse_pg_url(url) {
        Ok(PgUrl {
            password: Some(p), ..
        }) => url.replacen(&format!(":{p}@"), ":***@", 1),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_directory_url_gives_one_file_per_module() {
        let Location::SqliteFile(path) = Location::resolve("sqlite://data", "cart").unwrap() else {
            panic!("expected a sqlite file");
        };
        assert_eq!(path, PathBuf::from("data/cart.db"));
        let Location::SqliteFile(path) =
            Location::resolve("sqlite:///var/lib/colony/shop.db", "cart").unwrap()
        else {
            panic!("expected a sqlite file");
        };
        assert_eq!(path, PathBuf::from("/var/lib/colony/shop.db"));
    }

    #[test]
    fn unknown_scheme_is_a_config_error() {
        assert!(matches!(
            Location::resolve("mysql://x", "cart"),
            Err(DbError::Config(_))
        ));
    }

    #[test]
    fn module_url_swaps_credentials_and_keeps_the_rest() {
        let url = with_credentials(
            "postgres://admin:s3cret@db:5432/shop?sslmode=disable",
            "colony_cart",
            Some("pw"),
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://colony_cart:pw@db:5432/shop?sslmode=disable"
        );
        let url =
            with_credentials("postgres://postgres@127.0.0.1/shop", "colony_cart", None).unwrap();
        assert_eq!(url, "postgres://colony_cart@127.0.0.1/shop");
        assert!(derived_password("postgres://postgres@127.0.0.1/shop", "colony_cart").is_none());
        assert_eq!(redact("postgres://a:b@h/d"), "postgres://a:***@h/d");
    }
}
