//! The composition root of colony: configuration, wiring of the modules, the HTTP
//! server and the command line. Business rules live in the module crates.

/// The binary, its benchmarks and its integration tests allocate through mimalloc
/// (the module crates' own tests, which do not link this crate, do not). Under load
/// the process allocates and frees small buffers by the hundred thousand a second
/// across threads: for requests, JSON, events and statements' results. With the
/// system's allocator that was about a quarter of the process's CPU in a profile of
/// the marketplace benchmark (docs/performance.md, "Figures (2026-11-29, twelfth
/// session: the allocator …)").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod arch;
pub mod cli;
pub mod observe;
pub mod ops;
pub mod registry;
pub mod remote;
pub mod runtime;
pub mod seed;
pub mod settings;
pub mod startup;
pub mod telemetry;
