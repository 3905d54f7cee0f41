//! Point reads by key, made together under load: a lookup that arrives while a
//! lane is reading waits for that lane's next round, and one statement answers
//! every lookup of the round.
//!
//! A read by primary key costs little on the server; what it costs here is the
//! hand-offs around it: to a blocking thread, to the database's process and back.
//! With many readers at once those hand-offs, not the reads, bound the rate. A
//! lane keeps its blocking thread while lookups keep arriving and takes them in
//! rounds of up to `ROUND` keys, so the hand-offs are paid per round. Alone, a
//! lookup costs what a plain read costs: one round of one key.
//!
//! A lookup never sees older data than a plain read started at the same instant:
//! it joins only a round that has not begun, and each round's statement runs on
//! its own (`fetch` must not open a transaction that outlives it).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::db::{self, AnyConnection, Db, DbError};
use crate::metrics::Metrics;

/// Keys read by one statement, at most.
const ROUND: usize = 256;

type Fetch<K, V> =
    Box<dyn Fn(&mut AnyConnection, &[K]) -> Result<Vec<(K, V)>, DbError> + Send + Sync>;

/// What a lookup is answered: a failure is shared by every lookup of its round.
type Answer<V> = Result<Option<V>, Arc<DbError>>;

type Waiting<K, V> = VecDeque<(K, oneshot::Sender<Answer<V>>)>;

/// Lookups by key of one kind of row of one module's database.
pub struct Lookups<K, V> {
    shared: Arc<Shared<K, V>>,
}

impl<K, V> Clone for Lookups<K, V> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<K, V> {
    db: Db,
    /// What the lookups read, for the counters' labels.
    name: &'static str,
    metrics: Arc<Metrics>,
    fetch: Fetch<K, V>,
    lanes: usize,
    queue: Mutex<Queue<K, V>>,
}

struct Queue<K, V> {
    waiting: Waiting<K, V>,
    /// Lanes started and not yet stopped: each takes rounds until `waiting` is
    /// empty. Counted by `Lane`, which gives the count back however a lane ends.
    running: usize,
}

impl<K, V> Lookups<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Lookups of `name` (say, "products") on `db`, with at most `lanes` rounds
    /// at once, each on its own blocking thread and pooled connection; never more
    /// than a quarter of the pool. `fetch` is a round's statement: it reads the rows
    /// found among `keys` (each distinct) and returns them with their keys, in any
    /// order. Rounds and the lookups they answered are counted in `metrics`
    /// (`colony_lookup_rounds_total` and `colony_lookups_total`, by module and name).
    pub fn new<E: Into<DbError>>(
        db: Db,
        name: &'static str,
        metrics: Arc<Metrics>,
        lanes: usize,
        fetch: impl Fn(&mut AnyConnection, &[K]) -> Result<Vec<(K, V)>, E> + Send + Sync + 'static,
    ) -> Self {
        let quarter = usize::try_from(db.pool().max_size() / 4).unwrap_or(usize::MAX);
        Self {
            shared: Arc::new(Shared {
                db,
                name,
                metrics,
                fetch: Box::new(move |conn, keys| fetch(conn, keys).map_err(Into::into)),
                lanes: lanes.min(quarter).max(1),
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    running: 0,
                }),
            }),
        }
    }

    /// The row of `key`, or `None` if there is none. A failure of the round is
    /// `DbError::Shared`: `DbError::problem` answers it as it would the failure
    /// itself.
    pub async fn get(&self, key: K) -> Result<Option<V>, DbError> {
        let (tx, rx) = oneshot::channel();
        let lane = {
            let mut queue = self.shared.lock();
            queue.waiting.push_back((key, tx));
            (queue.running < self.shared.lanes).then(|| Lane::count(&self.shared, &mut queue))
        };
        if let Some(lane) = lane {
            // Runs to its end even if this lookup is dropped meanwhile; if it never
            // runs (the runtime is shutting down), dropping `lane` gives its count
            // back and fails the lookups that wait.
            drop(tokio::task::spawn_blocking(move || lane.run()));
        }
        match rx.await {
            Ok(answer) => answer.map_err(DbError::Shared),
            Err(_) => Err(DbError::Join("the lookup's round was abandoned".into())),
        }
    }

    /// Lookups queued for a round that has not begun.
    pub fn waiting(&self) -> usize {
        self.shared.lock().waiting.len()
    }
}

impl<K, V> Shared<K, V> {
    fn lock(&self) -> MutexGuard<'_, Queue<K, V>> {
        db::lock(&self.queue)
    }
}

/// One lane, counted in `Queue::running` from its start to its end.
struct Lane<K, V> {
    shared: Arc<Shared<K, V>>,
    /// False once `run` gave the count back itself.
    counted: bool,
}

impl<K, V> Lane<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone,
{
    /// Counts a lane, in the hold of the lock that decided to start it.
    fn count(shared: &Arc<Shared<K, V>>, queue: &mut Queue<K, V>) -> Self {
        queue.running += 1;
        Self {
            shared: shared.clone(),
            counted: true,
        }
    }

    /// Takes rounds until no lookup waits, then stops.
    fn run(mut self) {
        loop {
            let round: Vec<_> = {
                let mut queue = self.shared.lock();
                if queue.waiting.is_empty() {
                    // In the same hold of the lock that saw the queue empty, or a
                    // lookup queued meanwhile would count on this lane.
                    queue.running -= 1;
                    self.counted = false;
                    return;
                }
                let n = queue.waiting.len().min(ROUND);
                queue.waiting.drain(..n).collect()
            };
            let found = match self.shared.db.pool().get() {
                Ok(mut conn) => self.read(&mut conn, &round),
                Err(e) => {
                    // Waiting for the pool again would make every lookup queued
                    // meanwhile wait as long: they fail with this round.
                    let e = Arc::new(DbError::from(e));
                    let queued = std::mem::take(&mut self.shared.lock().waiting);
                    answer(queued, &Err(e.clone()));
                    Err(e)
                }
            };
            let labels = [
                ("module", self.shared.db.module()),
                ("lookup", self.shared.name),
            ];
            self.shared
                .metrics
                .inc("colony_lookup_rounds_total", &labels, 1);
            self.shared
                .metrics
                .inc("colony_lookups_total", &labels, round.len() as u64);
            answer(round, &found);
        }
    }

    fn read(
        &self,
        conn: &mut AnyConnection,
        round: &[(K, oneshot::Sender<Answer<V>>)],
    ) -> Result<HashMap<K, V>, Arc<DbError>> {
        let mut distinct = HashSet::with_capacity(round.len());
        let keys: Vec<K> = round
            .iter()
            .filter(|(key, _)| distinct.insert(key))
            .map(|(key, _)| key.clone())
            .collect();
        let rows = (self.shared.fetch)(conn, &keys).map_err(Arc::new)?;
        Ok(rows.into_iter().collect())
    }
}

/// Answers each lookup of `round` from what its statement `found`.
fn answer<K: Eq + Hash, V: Clone>(
    round: impl IntoIterator<Item = (K, oneshot::Sender<Answer<V>>)>,
    found: &Result<HashMap<K, V>, Arc<DbError>>,
) {
    for (key, tx) in round {
        let answer = match found {
            Ok(rows) => Ok(rows.get(&key).cloned()),
            Err(e) => Err(e.clone()),
        };
        // A lookup that went away needs no answer.
        let _ = tx.send(answer);
    }
}

impl<K, V> Drop for Lane<K, V> {
    /// A lane that panicked, or was dropped before it ran, gives its count back.
    /// If no other lane runs, the lookups that wait fail: none would take them
    /// until a later lookup starts a lane.
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        if std::thread::panicking() {
            tracing::error!(
                module = self.shared.db.module(),
                "a lane of lookups panicked"
            );
        }
        let mut queue = self.shared.lock();
        queue.running -= 1;
        if queue.running == 0 {
            queue.waiting.clear();
        }
    }
}
