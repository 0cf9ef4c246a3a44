//! The `sluice` binary: resolve the configuration, set up logging, serve until SIGTERM.

use std::process::ExitCode;

use sluice::config::{Config, LogFormat, ModelControlMode, Settings};
use sluice::server::{termination_signal, Server};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // Returns only when no re-execution was needed (or it failed: then libgomp's
    // spinning default stays, which costs CPU, not correctness).
    if let Err(e) = sluice::backend::openmp::ensure_default_wait_policy() {
        eprintln!("sluice: cannot re-execute with OMP_WAIT_POLICY=PASSIVE ({e}); OpenMP threads will spin between forwards");
    }
    let config = match Settings::load().and_then(Settings::validate) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    // Validation let this through only with allow_unauthenticated_model_control.
    if config.control.mode == ModelControlMode::Explicit && config.control.token.is_none() {
        tracing::warn!(
            "model control is explicit without a token (allow_unauthenticated_model_control): \
             anyone who reaches the gRPC port can load and unload models"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let server = Server::bind(config).await?;
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            termination_signal().await;
            trigger.cancel();
        });
        server.serve(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Text or JSON logs at the configured level.
fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    match config.log_format {
        // Colours only on a terminal: a file or a log collector gets plain text.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
}
