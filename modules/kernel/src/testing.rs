//! Throwaway databases for tests: a temporary SQLite directory, or a fresh
//! PostgreSQL database created through `COLONY_TEST_DATABASE_URL` and dropped after.

use std::path::PathBuf;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use uuid::Uuid;

/// The variable naming the PostgreSQL server tests may create databases on.
pub const POSTGRES_ENV: &str = "COLONY_TEST_DATABASE_URL";

pub enum TestDatabase {
    Sqlite { dir: PathBuf },
    Postgres { admin_url: String, name: String },
}

impl TestDatabase {
    /// A new empty directory for one SQLite file per module.
    pub fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("colony-test-{}", Uuid::now_v7().simple()));
        let _ = std::fs::create_dir_all(&dir);
        Self::Sqlite { dir }
    }

    /// A new empty PostgreSQL database, or `None` when `COLONY_TEST_DATABASE_URL` is
    /// unset. CI sets it (and a guard test fails in CI when it is missing).
    pub fn postgres() -> Option<Self> {
        let admin_url = std::env::var(POSTGRES_ENV).ok().filter(|u| !u.is_empty())?;
        let name = format!("colony_test_{}", Uuid::now_v7().simple());
        let mut admin = match PgConnection::establish(&admin_url) {
            Ok(c) => c,
            Err(e) => panic!("{POSTGRES_ENV} is set but PostgreSQL is unreachable: {e}"),
        };
        if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {name}")) {
            panic!("cannot create test database {name}: {e}");
        }
        Some(Self::Postgres { admin_url, name })
    }

    /// The `database.url` of this database.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite { dir } => format!("sqlite://{}", dir.display()),
            Self::Postgres { admin_url, name } => replace_database(admin_url, name),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }
}

/// A pool on `module`'s database of `test_db`, opened as the application opens it
/// and migrated with `migrations`.
pub fn migrated_pool(
    test_db: &TestDatabase,
    module: &'static str,
    migrations: crate::migrate::Migrations,
) -> crate::db::DbPool {
    use crate::db::{self, Location, PoolOptions};
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        panic!("cannot {what} {module}'s test database: {e}")
    };
    let location = Location::resolve(&test_db.url(), module).unwrap_or_else(|e| fail("locate", &e));
    let options = PoolOptions::default();
    let pool = db::prepare(&location, &options)
        .and_then(|connector| db::pool(connector, &options))
        .unwrap_or_else(|e| fail("open", &e));
    let mut conn = pool.get().unwrap_or_else(|e| fail("connect to", &e));
    crate::migrate::run_pending(&mut conn, module, migrations)
        .unwrap_or_else(|e| fail("migrate", &e));
    drop(conn);
    pool
}

/// A fresh SQLite database with `module`'s tables and a pool on it; keep the
/// database as long as the pool.
pub fn sqlite_pool(
    module: &'static str,
    migrations: crate::migrate::Migrations,
) -> (TestDatabase, crate::db::DbPool) {
    let test_db = TestDatabase::sqlite();
    let pool = migrated_pool(&test_db, module, migrations);
    (test_db, pool)
}

/// A fresh PostgreSQL database with `module`'s tables and a pool on it, or `None`
/// (saying so) when `COLONY_TEST_DATABASE_URL` is unset; keep the database as long
/// as the pool.
pub fn postgres_pool(
    module: &'static str,
    migrations: crate::migrate::Migrations,
) -> Option<(TestDatabase, crate::db::DbPool)> {
    let Some(test_db) = TestDatabase::postgres() else {
        eprintln!("skipped: {POSTGRES_ENV} is not set");
        return None;
    };
    let pool = migrated_pool(&test_db, module, migrations);
    Some((test_db, pool))
}

/// Whether `result` failed because the database refused a value: a check
/// constraint, or on PostgreSQL a domain's. Any other failure (a type mismatch, a
/// missing column) is not that.
pub fn refused_by_a_check<T>(result: &Result<T, diesel::result::Error>) -> bool {
    matches!(
        result,
        Err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::CheckViolation,
            _
        ))
    )
}

/// The statements `conn`'s PostgreSQL session has prepared by name, which it keeps
/// and runs again (`pg_prepared_statements`), that start with `start`; diesel
/// leaves a statement it will prepare anew on each run unnamed, and those are not
/// listed.
pub fn prepared_statements(conn: &mut crate::AnyConnection, start: &str) -> Vec<String> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement: String,
    }
    let crate::AnyConnection::Postgresql(conn) = conn else {
        panic!("prepared statements are read on PostgreSQL only")
    };
    diesel::sql_query("SELECT statement FROM pg_prepared_statements")
        .load::<Prepared>(conn)
        .unwrap_or_else(|e| panic!("cannot read pg_prepared_statements: {e}"))
        .into_iter()
        .map(|p| p.statement)
        .filter(|statement| statement.starts_with(start))
        .collect()
}

/// `url` pointing at database `name` instead of the one it names.
pub fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self {
            Self::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::Postgres { admin_url, name } => {
                if let Ok(mut admin) = PgConnection::establish(admin_url) {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            }
        }
    }
}

/// Runs each async scenario `fn(TestDatabase)` of the calling module in a test on
/// SQLite (module `sqlite`) and one on PostgreSQL (module `postgres`), which says
/// it skipped when `COLONY_TEST_DATABASE_URL` is unset (CI sets it, and a guard test
/// fails there when it is missing).
///
/// `on_both_backends!(@in a, b, if ready; scenarios…)` names the two modules `a`
/// and `b` instead, and runs the scenarios only when `ready` holds (say, when a
/// service they need is there).
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $crate::on_both_backends!(@in sqlite, postgres, if true; $($scenario),*);
    };
    (@in $sqlite:ident, $postgres:ident, if $ready:expr; $($scenario:ident),* $(,)?) => {
        mod $sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if $ready {
                        super::$scenario($crate::testing::TestDatabase::sqlite()).await;
                    }
                }
            )*
        }
        mod $postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if !$ready {
                        return;
                    }
                    match $crate::testing::TestDatabase::postgres() {
                        Some(db) => super::$scenario(db).await,
                        None => eprintln!("skipped: {} is not set", $crate::testing::POSTGRES_ENV),
                    }
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_database_name_keeping_credentials_and_options() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h", "t1"), "postgres://h/t1");
    }
}
