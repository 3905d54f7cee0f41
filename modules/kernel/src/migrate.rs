//! Per-module migrations: the kernel's event tables followed by the module's own,
//! applied into the module's own database (file or schema), so every module keeps
//! its own migrations table and reverting one never touches another.

use diesel::backend::Backend as DieselBackend;
use diesel::connection::SimpleConnection;
use diesel::migration::{Migration, MigrationSource};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::db::{AnyConnection, DbError};

const KERNEL_SQLITE: EmbeddedMigrations = embed_migrations!("../../migrations/kernel/sqlite");
const KERNEL_POSTGRES: EmbeddedMigrations = embed_migrations!("../../migrations/kernel/postgres");

/// A module's migrations, one set per backend. The two sets mostly mirror each other;
/// a migration that only one backend needs (PostgreSQL's domains) has no twin.
#[derive(Clone, Copy)]
pub struct Migrations {
    pub sqlite: &'static EmbeddedMigrations,
    pub postgres: &'static EmbeddedMigrations,
}

/// The kernel's migrations then the module's, ordered by version.
struct Chain<'a>([&'a EmbeddedMigrations; 2]);

impl<DB: DieselBackend> MigrationSource<DB> for Chain<'_> {
    fn migrations(&self) -> diesel::migration::Result<Vec<Box<dyn Migration<DB>>>> {
        let mut all = Vec::new();
        for part in self.0 {
            all.extend(MigrationSource::<DB>::migrations(part)?);
        }
        all.sort_by(|a, b| a.name().version().cmp(&b.name().version()));
        Ok(all)
    }
}

fn migration_error(e: impl std::fmt::Display) -> DbError {
    DbError::Migration(e.to_string())
}

/// Applies pending migrations; returns the names of those applied.
pub fn run_pending(
    conn: &mut AnyConnection,
    module: &str,
    migrations: Migrations,
) -> Result<Vec<String>, DbError> {
    match conn {
        AnyConnection::Sqlite(c) => c
            .run_pending_migrations(Chain([&KERNEL_SQLITE, migrations.sqlite]))
            .map(|v| v.iter().map(ToString::to_string).collect())
            .map_err(migration_error),
        AnyConnection::Postgresql(c) => {
            // Replicas starting together take turns; the lock is per module schema.
            let lock = format!("SELECT pg_advisory_lock(hashtext('colony.migrate.{module}'))");
            let unlock = format!("SELECT pg_advisory_unlock(hashtext('colony.migrate.{module}'))");
            c.batch_execute(&lock)?;
            let result = c
                .run_pending_migrations(Chain([&KERNEL_POSTGRES, migrations.postgres]))
                .map(|v| v.iter().map(ToString::to_string).collect())
                .map_err(migration_error);
            c.batch_execute(&unlock)?;
            result
        }
    }
}

/// Whether any migration of the module is still to be applied.
pub fn has_pending(conn: &mut AnyConnection, migrations: Migrations) -> Result<bool, DbError> {
    match conn {
        AnyConnection::Sqlite(c) => c
            .has_pending_migration(Chain([&KERNEL_SQLITE, migrations.sqlite]))
            .map_err(migration_error),
        AnyConnection::Postgresql(c) => c
            .has_pending_migration(Chain([&KERNEL_POSTGRES, migrations.postgres]))
            .map_err(migration_error),
    }
}

/// Reverts the module's newest migration (never another module's: each has its own table).
pub fn revert_last(conn: &mut AnyConnection, migrations: Migrations) -> Result<String, DbError> {
    match conn {
        AnyConnection::Sqlite(c) => c
            .revert_last_migration(Chain([&KERNEL_SQLITE, migrations.sqlite]))
            .map(|v| v.to_string())
            .map_err(migration_error),
        AnyConnection::Postgresql(c) => c
            .revert_last_migration(Chain([&KERNEL_POSTGRES, migrations.postgres]))
            .map(|v| v.to_string())
            .map_err(migration_error),
    }
}
