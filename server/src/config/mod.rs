//! Server configuration: one typed value, resolved once at start-up from (highest first)
//! command-line flags, `SLUICE_*` environment variables, an optional TOML file and the
//! defaults, then validated. Flag names follow `tritonserver` where it has one.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

pub use crate::limit::{LimitConfig, LimitMode};

mod admission;
mod defaults;
mod settings;
#[cfg(test)]
mod tests;
mod validate;

pub use admission::{AdmissionConfig, DeadlinePolicy, RetryBudget};
pub use settings::Settings;
pub use validate::idle_timeout;
use validate::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControlMode {
    None,
    Explicit,
    Poll,
}

impl ModelControlMode {
    /// The mode as the setting spells it.
    pub fn name(self) -> &'static str {
        match self {
            ModelControlMode::None => "none",
            ModelControlMode::Explicit => "explicit",
            ModelControlMode::Poll => "poll",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated, immutable configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub model_repository: PathBuf,
    pub host: IpAddr,
    pub grpc_port: u16,
    pub http_port: u16,
    pub metrics_port: u16,
    pub log_format: LogFormat,
    pub log_level: String,
    pub backend: BackendOptions,
    pub shutdown_grace_period: Duration,
    pub max_message_bytes: usize,
    pub edge: EdgeLimits,
    pub models: ModelDefaults,
    pub control: ModelControl,
    /// With [`ModelControlMode::Poll`]: time between two scans of the repository.
    pub repository_poll_interval: Duration,
    pub admission: AdmissionConfig,
    /// TLS on the gRPC and HTTP ports; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// Where TLS's certificate, key and (for mutual TLS) client CAs are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// What the server accepts from the network before any request handler runs: the
/// bounds on connections, HTTP/2 streams, headers and request bodies (see the README's
/// "Security" section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    pub max_request_bytes_in_flight: usize,
    pub max_connections: usize,
    pub max_http_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub http2_max_pending_reset_streams: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub idle_connection_timeout: Duration,
    pub body_read_timeout: Duration,
    pub header_read_timeout: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            max_request_bytes_in_flight: 256 * 1024 * 1024,
            max_connections: 1024,
            // The HTTP port serves REST inference: one request at a time per connection,
            // so as many clients as the gRPC port's connections.
            max_http_connections: 1024,
            // Equal to the per-model limit's default maximum, so that one connection can
            // fill a model's limit. Each open stream holds its header block (up to
            // max_header_list_bytes) until its body arrives, so this also bounds that
            // memory per connection.
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 * 1024,
            http2_max_pending_reset_streams: 20,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            idle_connection_timeout: Duration::from_secs(300),
            body_read_timeout: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Longest time any edge timeout may be set to (also keeps `now + timeout` far from
/// overflowing an `Instant`).
const MAX_EDGE_SECS: u64 = 86_400;
/// Longest idle timeout or target delay, in seconds (a year).
const MAX_TIMEOUT_SECS_F64: f64 = 31_536_000.0;
/// Largest gRPC message: its length travels in a 32-bit field, and a buffer of this size
/// is reserved per message in flight.
const MAX_MESSAGE_BYTES_LIMIT: usize = 1 << 30;

/// Server-wide defaults for per-model settings a config.pbtxt leaves unset, and the
/// bounds every config.pbtxt is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub min_instances: Option<usize>,
    pub idle_timeout: Duration,
    /// An instance whose execution has run this long is stuck; `None`: never checked.
    pub max_execution: Option<Duration>,
    pub limits: ModelLimits,
}

/// What one model's configuration may make the server spawn or hold. A model beyond
/// them is reported UNAVAILABLE with the reason; the others serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Instance threads of one model: instance_group counts summed, times its versions.
    pub max_model_instances: usize,
    /// Warm-up bytes one model holds, all samples together.
    pub max_warmup_bytes: usize,
}

impl Default for ModelLimits {
    fn default() -> ModelLimits {
        ModelLimits {
            max_model_instances: DEFAULT_MAX_MODEL_INSTANCES,
            max_warmup_bytes: DEFAULT_MAX_WARMUP_BYTES,
        }
    }
}

const DEFAULT_MAX_MODEL_INSTANCES: usize = 64;
/// The most `max_model_instances` may be raised to: each instance is an OS thread, and
/// the pool sizes its event channel from the count.
pub const MAX_MODEL_INSTANCES_CEILING: usize = 4096;
const DEFAULT_MAX_WARMUP_BYTES: usize = 256 * 1024 * 1024;
/// Longest model control token accepted: it travels in one HTTP/2 header.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Triton's default `--repository-poll-secs`.
pub const DEFAULT_REPOSITORY_POLL_SECS: u64 = 15;
/// Bounds of `repository_poll_secs`: at least a second (a scan reads every model
/// directory), at most a day.
pub const REPOSITORY_POLL_SECS_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;
/// A token file may add a CRLF to the token.
const MAX_TOKEN_FILE_BYTES: u64 = 4096 + 2;

/// Who may load and unload models, and which load at start-up.
#[derive(Clone, PartialEq)]
pub struct ModelControl {
    pub mode: ModelControlMode,
    pub load_models: Vec<String>,
    pub token: Option<String>,
}

/// The token never reaches a log line or a panic message through `{:?}` of the config.
impl std::fmt::Debug for ModelControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelControl")
            .field("mode", &self.mode)
            .field("load_models", &self.load_models)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Options every backend instance is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendOptions {
    /// Threads per instance; `None`: the cores shared among the model's instances.
    pub intra_op_threads: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

impl Config {
    /// Settings that are valid but work against each other, one sentence each, for the
    /// start-up log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let streams = self.edge.max_concurrent_streams as usize;
        if self.admission.shedding && streams < self.admission.model_limit.max {
            warnings.push(format!(
                "max_concurrent_streams {streams} is below max_concurrency_limit {}: a client \
                 on one connection can never fill a model's limit, and what it offers beyond \
                 its streams waits in its own HTTP/2 layer, where no limit can refuse it",
                self.admission.model_limit.max
            ));
        }
        warnings
    }

    /// Defaults with every port at 0 (free ports), for tests and embedding.
    pub fn for_repository(model_repository: impl Into<PathBuf>) -> Config {
        Settings {
            model_repository: Some(model_repository.into()),
            grpc_port: Some(0),
            http_port: Some(0),
            metrics_port: Some(0),
            ..Settings::default()
        }
        .validate_unchecked()
    }

    // Kept whole: the checks that relate settings to each other, one after another.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting, message: String| Err(ConfigError::Invalid { setting, message });
        if !self.model_repository.is_dir() {
            return invalid(
                "model_repository",
                format!("{} is not a directory", self.model_repository.display()),
            );
        }
        let ports = [
            ("grpc_port", self.grpc_port),
            ("http_port", self.http_port),
            ("metrics_port", self.metrics_port),
        ];
        for (i, (name_a, a)) in ports.iter().enumerate() {
            for (name_b, b) in &ports[i + 1..] {
                if *a != 0 && a == b {
                    return invalid(name_b, format!("port {b} is already used by {name_a}"));
                }
            }
        }
        if self.shutdown_grace_period > Duration::from_secs(MAX_EDGE_SECS) {
            return invalid(
                "shutdown_grace_period_secs",
                format!(
                    "{} is above {MAX_EDGE_SECS}",
                    self.shutdown_grace_period.as_secs()
                ),
            );
        }
        if self.backend.intra_op_threads == Some(0) {
            return invalid("intra_op_threads", "must be at least 1".to_owned());
        }
        if !(1024..=MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return invalid(
                "max_message_bytes",
                format!(
                    "{} is not within 1024..={MAX_MESSAGE_BYTES_LIMIT}",
                    self.max_message_bytes
                ),
            );
        }
        if self.edge.max_request_bytes_in_flight < self.max_message_bytes {
            return invalid(
                "max_request_bytes_in_flight",
                format!(
                    "{} is below max_message_bytes {}: a message of the largest size could never be received",
                    self.edge.max_request_bytes_in_flight, self.max_message_bytes
                ),
            );
        }
        if self.control.mode != ModelControlMode::Explicit && !self.control.load_models.is_empty() {
            return invalid(
                "load_model",
                format!(
                    "needs model_control_mode explicit (in mode {} every model loads)",
                    self.control.mode.name()
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return invalid("log_level", format!("'{}': {e}", self.log_level));
        }
        Ok(())
    }
}
