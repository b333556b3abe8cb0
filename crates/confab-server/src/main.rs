//! The `confab` binary. Parses the command line, runs the command, and turns failures into
//! one line on stderr and an exit code: 2 for configuration errors, 1 otherwise.

use std::process::ExitCode;

use clap::Parser;
use confab_server::cli::Cli;
use confab_server::commands::{self, EXIT_CONFIG, Failure};

/// mimalloc: a long-running server's memory stays close to what it uses (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` (`mi_option_t` in mimalloc v3's `mimalloc.h`; libmimalloc-sys
/// names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed is given back to the OS at once. mimalloc v3 waits 1 s and then purges only
/// when the thread that freed allocates again: a burst of sign-ups (19 MiB of argon2 memory
/// per hash, on blocking-pool threads that then idle) stayed resident for good, 55 MiB of a
/// 90 MiB server (BENCHMARKS.md).
#[allow(unsafe_code)]
fn configure_allocator() {
    // SAFETY: sets a plain integer option; called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() -> ExitCode {
    configure_allocator();
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
