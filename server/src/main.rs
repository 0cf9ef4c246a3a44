//! The `sluice` binary: resolve the configuration, set up logging, serve until SIGTERM
//! (or SIGINT), then drain; a second such signal during the drain exits at once.

use std::process::ExitCode;

use sluice::config::{Config, LogFormat, ModelControlMode, Settings};
use sluice::server::Server;
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
        spawn_signal_handler(shutdown.clone());
        server.serve(shutdown).await
    });
    // The drain has had its grace period: a model load still running on a blocking
    // thread (a poll, or a load call) is not waited for.
    runtime.shutdown_background();
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

/// The first SIGTERM or SIGINT starts the drain (cancels `shutdown`); a second one ends
/// the process at once, with exit status 128 + its number, as a shell reports a process
/// killed by it: 143 for SIGTERM, 130 for SIGINT. The signals are listened for from
/// this call on, so none is missed between the two.
fn spawn_signal_handler(shutdown: CancellationToken) {
    let mut signals = match Signals::listen() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT; they stop the process at once");
            return;
        }
    };
    tokio::spawn(async move {
        let (first, _) = signals.next().await;
        tracing::info!("received {first}");
        shutdown.cancel();
        let (second, status) = signals.next().await;
        tracing::warn!(
            exit_status = status,
            "received {second} while draining; exiting at once"
        );
        eprintln!("sluice: received {second} while draining; exiting at once");
        std::process::exit(i32::from(status));
    });
}

/// The termination signals, SIGTERM and SIGINT (Ctrl-C where there are no Unix signals).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn listen() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// The next signal: its name and the exit status that reports it.
    #[cfg(unix)]
    async fn next(&mut self) -> (&'static str, u8) {
        tokio::select! {
            _ = self.term.recv() => ("SIGTERM", 128 + 15),
            _ = self.int.recv() => ("SIGINT", 128 + 2),
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> (&'static str, u8) {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        ("Ctrl-C", 128 + 2)
    }
}
