//! The `colony` command line.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use kernel::auth::{Authenticator, Role};
use kernel::bus::dead_letters;
use kernel::db::write_tx;
use kernel::migrate;

use crate::registry;
use crate::runtime::open_database;
use crate::settings::Settings;
use crate::startup::Application;

#[derive(Parser)]
#[command(
    name = "colony",
    version,
    about = "A marketplace backend: a modular monolith with extraction seams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the HTTP server and the event machinery of the named modules.
    Serve {
        /// Comma-separated modules to run here (default: all).
        #[arg(long)]
        modules: Option<String>,
    },
    /// Applies pending migrations, per module (serve does this at start too).
    Migrate {
        /// Only this module.
        #[arg(long)]
        module: Option<String>,
        /// Reverts the newest migration of the module instead (needs --module).
        #[arg(long, requires = "module")]
        revert: bool,
    },
    /// Prints a signed bearer token for local use.
    Token {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        role: Role,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Parked events: list and replay.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Fills a fresh instance with a demo catalog and prints tokens to try it with.
    Seed,
    /// Prints the module and event graph, or checks it.
    Arch {
        #[arg(value_enum, default_value_t = ArchFormat::Mermaid)]
        format: ArchFormat,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Lists parked events.
    DeadLetters {
        #[arg(long)]
        module: Option<String>,
    },
    /// Re-queues parked events for their consumer.
    Replay {
        /// The dead letter's id (see `dead-letters`).
        id: Option<String>,
        /// Every open dead letter (of --module, if given).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long)]
        module: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchFormat {
    Mermaid,
    Dot,
    Check,
}

/// Parses `90s`, `30m`, `1h`, `7d` (a bare number is seconds).
fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (digits, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("the lifetime must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("colony: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    match cli.command {
        Command::Serve { modules } => serve(settings, modules.as_deref()),
        Command::Migrate { module, revert } => {
            migrate_command(&settings, module.as_deref(), revert)
        }
        Command::Token { subject, role, ttl } => {
            println!(
                "{}",
                Authenticator::new(&settings.auth.jwt_secret).issue(&subject, role, ttl)
            );
            Ok(())
        }
        Command::Events { command } => events(&settings, command),
        Command::Seed => crate::seed::run(&settings),
        Command::Arch { format } => arch(format),
    }
}

fn serve(settings: Settings, modules: Option<&str>) -> anyhow::Result<()> {
    crate::telemetry::init(&settings.log);
    let specs = registry::select(modules)?;
    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
    actix_web::rt::System::new().block_on(async move {
        let host = settings.http.host.clone();
        let app = Application::build(settings, specs).await?;
        println!(
            "colony listening on http://{host}:{} (modules: {})",
            app.port(),
            names.join(", ")
        );
        tracing::info!(port = app.port(), modules = %names.join(","), "listening");
        app.run_until_stopped().await
    })
}

fn migrate_command(settings: &Settings, module: Option<&str>, revert: bool) -> anyhow::Result<()> {
    for spec in registry::select(module)? {
        let db = open_database(settings, &spec, false)?;
        let mut conn = db.pool().get()?;
        if revert {
            let reverted = migrate::revert_last(&mut conn, spec.migrations)?;
            println!("{}: reverted {reverted}", spec.name);
            continue;
        }
        let applied = migrate::run_pending(&mut conn, spec.name, spec.migrations)?;
        if applied.is_empty() {
            println!("{}: up to date", spec.name);
        }
        for name in applied {
            println!("{}: applied {name}", spec.name);
        }
    }
    Ok(())
}

fn events(settings: &Settings, command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::DeadLetters { module } => {
            let mut total = 0;
            for spec in registry::select(module.as_deref())? {
                let db = open_database(settings, &spec, false)?;
                let mut conn = db.pool().get()?;
                for letter in dead_letters::list(&mut conn)
                    .with_context(|| format!("reading {}", spec.name))?
                {
                    total += 1;
                    println!(
                        "{}\tmodule={}\tevent={}\t{}\tkey={}\tattempts={}\tparked_at={}\terror={}",
                        letter.id,
                        spec.name,
                        letter.event_id,
                        letter.name,
                        letter.aggregate_id,
                        letter.attempts,
                        letter.parked_at,
                        letter.error
                    );
                }
            }
            eprintln!("{total} dead letter(s)");
            Ok(())
        }
        EventsCommand::Replay { id, all, module } => {
            if id.is_none() && !all {
                bail!("name a dead letter id, or --all");
            }
            let mut replayed = 0;
            for spec in registry::select(module.as_deref())? {
                let db = open_database(settings, &spec, false)?;
                let mut conn = db.pool().get()?;
                let ids: Vec<String> = match &id {
                    Some(id) => vec![id.clone()],
                    None => dead_letters::list(&mut conn)?
                        .into_iter()
                        .map(|l| l.id)
                        .collect(),
                };
                for id in ids {
                    match write_tx(&mut conn, |conn| dead_letters::replay(conn, &id)) {
                        Ok(letter) => {
                            replayed += 1;
                            println!("{}: re-queued {} ({})", spec.name, letter.id, letter.name);
                        }
                        Err(dead_letters::ReplayError::NotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if replayed == 0 && id.is_some() {
                bail!("no open dead letter with that id");
            }
            eprintln!("{replayed} re-queued; a running colony handles them at its next poll");
            Ok(())
        }
    }
}

fn arch(format: ArchFormat) -> anyhow::Result<()> {
    let events = contracts::all_event_names();
    let published = |module: &str| -> Vec<&str> {
        events
            .iter()
            .copied()
            .filter(|e| e.split('.').next() == Some(module))
            .collect()
    };
    match format {
        ArchFormat::Mermaid => {
            println!("flowchart LR");
            for spec in &registry::ALL {
                println!("  {0}[{0}]", spec.name);
            }
            for spec in &registry::ALL {
                for source in spec.consumes {
                    println!(
                        "  {source} -- \"{}\" --> {}",
                        published(source).join("<br/>"),
                        spec.name
                    );
                }
            }
        }
        ArchFormat::Dot => {
            println!("digraph colony {{\n  rankdir=LR;");
            for spec in &registry::ALL {
                println!(
                    "  {} [shape=box, tooltip=\"{}\"];",
                    spec.name,
                    published(spec.name).join("\\n")
                );
            }
            for spec in &registry::ALL {
                for source in spec.consumes {
                    println!(
                        "  {source} -> {} [label=\"{}\"];",
                        spec.name,
                        published(source).join("\\n")
                    );
                }
            }
            println!("}}");
        }
        ArchFormat::Check => {
            let problems = crate::arch::check(&events);
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("boundary: {p}");
                }
                bail!("{} architecture problem(s)", problems.len());
            }
            println!(
                "ok: {} modules, {} events",
                registry::ALL.len(),
                events.len()
            );
        }
    }
    Ok(())
}
