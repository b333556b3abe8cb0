//! The `confab` binary. Parses the command line, runs the command, and turns failures into
//! one line on stderr and an exit code: 2 for configuration errors, 1 otherwise.

use std::process::ExitCode;

use clap::Parser;
use confab_server::cli::Cli;
use confab_server::commands::{self, EXIT_CONFIG, Failure};

/// mimalloc: a long-running server's memory stays close to what it uses (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Several crates link rustls; one process-wide crypto provider must be chosen before the
    // first TLS connection (rediss://, amqps://, https), or that connection panics.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("confab: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(Failure::Config(e)) => {
            eprintln!("confab: CONFIG_ERROR {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            tracing::error!(error = format!("{e:#}"), "Stopped on an error.");
            eprintln!("confab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
