//! The confab server: configuration, telemetry, HTTP, and the wiring of ports to services.
//!
//! `main.rs` is a thin shell over this library so that tests drive the same code
//! ([`startup::Application`]) that the binary runs.

pub mod ai;
pub mod cli;
pub mod commands;
pub mod config;
pub mod health;
pub mod http;
pub mod jobs;
pub mod mail;
pub mod metrics;
pub mod realtime;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod workers;
