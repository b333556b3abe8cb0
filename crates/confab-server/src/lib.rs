//! The confab server: configuration, telemetry, HTTP, and the wiring of ports to services.

pub mod config;
