//! Point reads by key, made together under load: a lookup that arrives while a
//! lane is reading waits for that lane's next round, and one statement answers
//! every lookup of the round.
//!
//! A read by primary key costs little on the server; what it costs here is the
//! hand-offs around it: to a blocking thread, to the database's process and back.
//! With many readers at once those hand-offs, not the reads, bound the rate. A
//! lane keeps its thread and its connection while lookups keep arriving, and
//! takes them in rounds of up to `ROUND` keys, so the hand-offs are paid per round.
//! Alone, a lookup costs what a plain read costs: one round of one key.
//!
//! A lookup never sees older data than a plain read started at the same instant:
//! it joins only a round that has not begun, so the round's statement starts after
//! the lookup arrived.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::db::{AnyConnection, Db, DbError, PooledConn};

/// Keys read by one statement, at most.
const ROUND: usize = 256;

type Fetch<K, V> =
    Box<dyn Fn(&mut AnyConnection, &[K]) -> Result<Vec<(K, V)>, DbError> + Send + Sync>;

type Answer<V> = Result<Option<V>, Arc<DbError>>;

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
    fetch: Fetch<K, V>,
    lanes: usize,
    queue: Mutex<Queue<K, V>>,
}

struct Queue<K, V> {
    waiting: Vec<(K, oneshot::Sender<Answer<V>>)>,
    /// Lanes at work: each takes rounds until `waiting` is empty.
    running: usize,
}

impl<K, V> Lookups<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Lookups on `db`, with at most `lanes` rounds running at once (each on its
    /// own blocking thread and connection). `fetch` is a round's statement: it
    /// reads the rows found among `keys` (each distinct) and returns them with
    /// their keys, in any order.
    pub fn new(
        db: Db,
        lanes: usize,
        fetch: impl Fn(&mut AnyConnection, &[K]) -> Result<Vec<(K, V)>, DbError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                db,
                fetch: Box::new(fetch),
                lanes: lanes.max(1),
                queue: Mutex::new(Queue {
                    waiting: Vec::new(),
                    running: 0,
                }),
            }),
        }
    }

    /// The row of `key`, or `None` if there is none.
    pub async fn get(&self, key: K) -> Result<Option<V>, DbError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queue = self.shared.lock();
            queue.waiting.push((key, tx));
            let start = queue.running < self.shared.lanes;
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            let shared = self.shared.clone();
            // Runs to its end even if this lookup is dropped meanwhile.
            drop(tokio::task::spawn_blocking(move || shared.lane()));
        }
        match rx.await {
            Ok(answer) => answer.map_err(DbError::Shared),
            Err(_) => Err(DbError::Join("the lookup's round was abandoned".into())),
        }
    }
}

impl<K, V> Shared<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<K, V>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes rounds until no lookup waits, then stops.
    fn lane(&self) {
        let mut running = Running {
            shared: self,
            counted: true,
        };
        let mut conn = None;
        loop {
            let round: Vec<_> = {
                let mut queue = self.lock();
                if queue.waiting.is_empty() {
                    // In the same hold of the lock that saw the queue empty, or a
                    // lookup queued meanwhile would count on this lane.
                    queue.running -= 1;
                    running.counted = false;
                    return;
                }
                let n = queue.waiting.len().min(ROUND);
                queue.waiting.drain(..n).collect()
            };
            let found = match &mut conn {
                Some(conn) => self.read(conn, &round),
                None => match self.db.pool().get() {
                    Ok(c) => self.read(conn.insert(c), &round),
                    Err(e) => Err(Arc::new(DbError::from(e))),
                },
            };
            if found.is_err() {
                // The connection may be what failed: the next round takes another.
                conn = None;
            }
            for (key, tx) in round {
                let answer = match &found {
                    Ok(rows) => Ok(rows.get(&key).cloned()),
                    Err(e) => Err(e.clone()),
                };
                // A lookup that went away needs no answer.
                let _ = tx.send(answer);
            }
        }
    }

    fn read(
        &self,
        conn: &mut PooledConn,
        round: &[(K, oneshot::Sender<Answer<V>>)],
    ) -> Result<HashMap<K, V>, Arc<DbError>> {
        let mut distinct = HashSet::with_capacity(round.len());
        let keys: Vec<K> = round
            .iter()
            .filter(|(key, _)| distinct.insert(key))
            .map(|(key, _)| key.clone())
            .collect();
        let rows = (self.fetch)(conn, &keys).map_err(Arc::new)?;
        Ok(rows.into_iter().collect())
    }
}

/// A lane's count in the queue, given back if the lane panics. The lookups that
/// wait are then dropped: they fail instead of waiting for a lane that only a
/// later lookup would start.
struct Running<'a, K, V> {
    shared: &'a Shared<K, V>,
    counted: bool,
}

impl<K, V> Drop for Running<'_, K, V> {
    fn drop(&mut self) {
        if self.counted {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.running -= 1;
            queue.waiting.clear();
        }
    }
}
