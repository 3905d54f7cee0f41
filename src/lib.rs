//! The composition root of colony: configuration, wiring of the modules, the HTTP
//! server and the command line. Business rules live in the module crates.

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
