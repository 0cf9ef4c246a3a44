//! Server configuration: one typed value, resolved once at start-up from (highest first)
//! command-line flags, `SLUICE_*` environment variables, an optional TOML file and the
//! defaults, then validated. Flag names follow `tritonserver` where it has one.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::admission::deadline::DeadlinePolicy;
use crate::admission::limit::{LimitConfig, LimitMode};
use crate::admission::retry::RetryBudget;
use crate::admission::AdmissionConfig;

/// Every setting, as given by one source. `None` means "not set here".
///
/// The same struct is the command line (with `--help`) and the TOML file schema, so the
/// two cannot drift apart; TOML keys are the flag names in snake_case.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(name = "sluice", version, long_about = None, about = "Model-serving gRPC gateway for TorchScript models (KServe v2 / Triton protocol)")]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of the settings below (keys in snake_case, e.g. `grpc_port = 8001`).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Model repository in Triton's layout: `<dir>/<model>/config.pbtxt` and
    /// `<dir>/<model>/<version>/model.pt`. [default: models]
    #[arg(long, env = "SLUICE_MODEL_REPOSITORY", value_name = "DIR")]
    pub model_repository: Option<PathBuf>,

    /// Address to listen on for gRPC, HTTP and metrics. Use 0.0.0.0 in containers. [default: 127.0.0.1]
    #[arg(long, env = "SLUICE_HOST", value_name = "ADDR")]
    pub host: Option<IpAddr>,

    /// gRPC port (KServe v2 inference, grpc.health.v1, reflection); 0 picks a free port. [default: 8001]
    #[arg(long, env = "SLUICE_GRPC_PORT", value_name = "PORT")]
    pub grpc_port: Option<u16>,

    /// HTTP port for /v2/health/live, /v2/health/ready and /v2/models/<m>/ready. [default: 8000]
    #[arg(long, env = "SLUICE_HTTP_PORT", value_name = "PORT")]
    pub http_port: Option<u16>,

    /// Prometheus metrics port (/metrics). [default: 8002]
    #[arg(long, env = "SLUICE_METRICS_PORT", value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// Log line format: `text` or `json`. [default: text]
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `sluice=debug,tower=warn`. [default: info]
    #[arg(long, env = "SLUICE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// libtorch intra-op threads per model instance. [default: the machine's cores
    /// shared among the model's instances: cores / instance count, at least 1]
    #[arg(long, env = "SLUICE_INTRA_OP_THREADS", value_name = "N")]
    pub intra_op_threads: Option<usize>,

    /// Seconds to finish in-flight work after SIGTERM/SIGINT before exiting. [default: 30]
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_PERIOD_SECS", value_name = "SECS")]
    pub shutdown_grace_period_secs: Option<u64>,

    /// Largest gRPC message accepted or sent, in bytes. [default: 67108864]
    #[arg(long, env = "SLUICE_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Request bytes being received and decoded in the whole server, from each message's
    /// gRPC header until its call is answered; a message that does not fit is refused
    /// UNAVAILABLE at once. At least max_message_bytes. [default: 268435456]
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES_IN_FLIGHT", value_name = "BYTES")]
    pub max_request_bytes_in_flight: Option<usize>,

    /// Open gRPC connections; more are closed as soon as they are accepted. [default: 1024]
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Open connections on each HTTP/1 port (health, metrics); more are closed as soon as
    /// they are accepted. [default: 128]
    #[arg(long, env = "SLUICE_MAX_HTTP_CONNECTIONS", value_name = "N")]
    pub max_http_connections: Option<usize>,

    /// HTTP/2 streams (calls) open at once on one gRPC connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// clients queue beyond it, where no limit of the server can refuse their calls, so
    /// keep it above max_concurrency_limit. [default: 1024]
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<u32>,

    /// Largest header block (metadata) of one gRPC call, in bytes. [default: 16384]
    #[arg(long, env = "SLUICE_MAX_HEADER_LIST_BYTES", value_name = "BYTES")]
    pub max_header_list_bytes: Option<u32>,

    /// Streams a gRPC client may reset before the server reads them, per connection;
    /// past it the connection is closed (HTTP/2 rapid-reset protection). [default: 20]
    #[arg(long, env = "SLUICE_HTTP2_MAX_PENDING_RESET_STREAMS", value_name = "N")]
    pub http2_max_pending_reset_streams: Option<usize>,

    /// Seconds between HTTP/2 keepalive pings on a gRPC connection. [default: 60]
    #[arg(
        long,
        env = "SLUICE_HTTP2_KEEPALIVE_INTERVAL_SECS",
        value_name = "SECS"
    )]
    pub http2_keepalive_interval_secs: Option<u64>,

    /// Seconds to wait for a keepalive ping's answer before closing the connection. [default: 20]
    #[arg(long, env = "SLUICE_HTTP2_KEEPALIVE_TIMEOUT_SECS", value_name = "SECS")]
    pub http2_keepalive_timeout_secs: Option<u64>,

    /// Seconds a connection (gRPC or HTTP/1) may stay open without a call in progress
    /// before the server closes it. [default: 300]
    #[arg(long, env = "SLUICE_IDLE_CONNECTION_TIMEOUT_SECS", value_name = "SECS")]
    pub idle_connection_timeout_secs: Option<u64>,

    /// Seconds within which a gRPC request message must arrive in full, counted from the
    /// call's headers (unary) or the message's first bytes (streams); a slower body is
    /// answered DEADLINE_EXCEEDED and its buffer freed. [default: 15]
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT_SECS", value_name = "SECS")]
    pub body_read_timeout_secs: Option<u64>,

    /// Seconds within which an HTTP/1 request's headers must arrive. [default: 10]
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_SECS", value_name = "SECS")]
    pub header_read_timeout_secs: Option<u64>,

    /// Instances each model keeps loaded however idle, for models whose config has no
    /// `min_instances` parameter; 0 lets idle models scale to zero. [default: each model's
    /// instance_group count, i.e. no scaling]
    #[arg(long, env = "SLUICE_MIN_INSTANCES", value_name = "N")]
    pub min_instances: Option<usize>,

    /// Seconds an instance may stay idle before it is unloaded (down to the minimum), for
    /// models whose config has no `idle_timeout_secs` parameter. [default: 300]
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub idle_timeout_secs: Option<f64>,

    /// Longest one execution (one batch's forward) may run, in seconds. An instance still
    /// running past it is stuck: its requests are answered INTERNAL, it gets no more work
    /// and a replacement is loaded while the model has fewer than instance_group count
    /// stuck threads; when every instance is stuck and none can be replaced, liveness
    /// turns false. 0 turns the check off (a hung model then holds its requests until
    /// their deadlines). At most 86400. [default: 60]
    #[arg(long, env = "SLUICE_MAX_EXECUTION_SECS", value_name = "SECS")]
    pub max_execution_secs: Option<f64>,

    /// `none`: load every model at start-up, no load/unload RPCs. `explicit`: load only
    /// `--load-model` models at start-up; RepositoryModelLoad/Unload manage the rest. [default: none]
    #[arg(long, env = "SLUICE_MODEL_CONTROL_MODE", value_name = "MODE")]
    pub model_control_mode: Option<ModelControlMode>,

    /// With `--model-control-mode explicit`: a model to load at start-up (repeat the flag,
    /// or separate names with commas; `*` loads all).
    #[arg(
        long,
        env = "SLUICE_LOAD_MODEL",
        value_name = "MODEL",
        value_delimiter = ','
    )]
    pub load_model: Option<Vec<String>>,

    /// Bearer token that RepositoryModelLoad/Unload calls must send
    /// (`authorization: Bearer <token>`): visible ASCII, not empty. With
    /// `--model-control-mode explicit` a token (or `--model-control-token-file`) is required
    /// unless `--allow-unauthenticated-model-control true`. [default: none]
    #[arg(
        long,
        env = "SLUICE_MODEL_CONTROL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub model_control_token: Option<String>,

    /// File holding the model control token (one line; a trailing newline is ignored), e.g.
    /// a mounted Kubernetes Secret. Not together with `--model-control-token`.
    #[arg(long, env = "SLUICE_MODEL_CONTROL_TOKEN_FILE", value_name = "FILE")]
    pub model_control_token_file: Option<PathBuf>,

    /// Let `--model-control-mode explicit` run without a token, so that anyone who reaches
    /// the gRPC port can load and unload models. Without this, explicit mode with no token
    /// refuses to start. [default: false]
    #[arg(
        long,
        env = "SLUICE_ALLOW_UNAUTHENTICATED_MODEL_CONTROL",
        value_name = "BOOL"
    )]
    pub allow_unauthenticated_model_control: Option<bool>,

    /// Most instances (threads) one model may run: its instance_group counts summed, times
    /// the versions it serves. A config asking for more is not loaded. [default: 64]
    #[arg(long, env = "SLUICE_MAX_MODEL_INSTANCES", value_name = "N")]
    pub max_model_instances: Option<usize>,

    /// Most bytes of warm-up data one model may hold (all its warm-up samples together,
    /// including the default zero-filled ones). A config asking for more is not loaded. [default: 268435456]
    #[arg(long, env = "SLUICE_MAX_WARMUP_BYTES", value_name = "BYTES")]
    pub max_warmup_bytes: Option<u64>,

    /// Server-side deadline of every inference request, in milliseconds: a request gets
    /// the smallest of this, its `grpc-timeout` and its `timeout` parameter. [default: none]
    #[arg(long, env = "SLUICE_DEFAULT_TIMEOUT_MS", value_name = "MS")]
    pub default_timeout_ms: Option<u64>,

    /// Longest deadline any inference request gets, in milliseconds, whatever it asks
    /// for. [default: none]
    #[arg(long, env = "SLUICE_MAX_TIMEOUT_MS", value_name = "MS")]
    pub max_timeout_ms: Option<u64>,

    /// Refuse excess load at once: the in-flight and concurrency limits, and refusing
    /// requests whose predicted queue wait exceeds their deadline. `false`: only each
    /// model's max_queue_size bounds waiting requests. [default: true]
    #[arg(long, env = "SLUICE_LOAD_SHEDDING", value_name = "BOOL")]
    pub load_shedding: Option<bool>,

    /// Inference requests in flight in the whole server; more are refused UNAVAILABLE. [default: 2048]
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,

    /// Per-model concurrency limit: `adaptive` (follows the model's queue delay between
    /// the min and max) or `static` (always the max). [default: adaptive]
    #[arg(long, env = "SLUICE_CONCURRENCY_LIMIT_MODE", value_name = "MODE")]
    pub concurrency_limit_mode: Option<LimitMode>,

    /// Lowest per-model concurrency limit. [default: 2]
    #[arg(long, env = "SLUICE_MIN_CONCURRENCY_LIMIT", value_name = "N")]
    pub min_concurrency_limit: Option<usize>,

    /// Highest per-model concurrency limit (and its start value). [default: 256]
    #[arg(long, env = "SLUICE_MAX_CONCURRENCY_LIMIT", value_name = "N")]
    pub max_concurrency_limit: Option<usize>,

    /// Queue delay the adaptive limit allows beyond the model's own
    /// `max_queue_delay_microseconds`, in milliseconds. [default: four of the model's
    /// fastest measured single-sample executions, at least 1 ms]
    #[arg(long, env = "SLUICE_TARGET_QUEUE_DELAY_MS", value_name = "MS")]
    pub target_queue_delay_ms: Option<f64>,

    /// Retries of transient failures allowed, as a percentage of recent requests (on
    /// top of the minimum per second). [default: 20]
    #[arg(long, env = "SLUICE_RETRY_BUDGET_PERCENT", value_name = "PERCENT")]
    pub retry_budget_percent: Option<f32>,

    /// Retries of transient failures always allowed per second. [default: 10]
    #[arg(long, env = "SLUICE_RETRY_MIN_PER_SEC", value_name = "N")]
    pub retry_min_per_sec: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControlMode {
    None,
    Explicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
    pub admission: AdmissionConfig,
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
            max_http_connections: 128,
            // Four times the per-model limit's default maximum: a client on one
            // connection (tritonclient, perf_analyzer) that offers more than a model
            // takes is refused at once by that model's limit, instead of queuing in its
            // own HTTP/2 layer (invisible to the server) until its deadline.
            max_concurrent_streams: 1024,
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

impl Settings {
    /// Settings from the command line and environment, merged over the config file they name.
    pub fn load() -> Result<Settings, ConfigError> {
        let cli = Settings::parse();
        match cli.config.clone() {
            Some(path) => Ok(cli.or(Settings::from_file(&path)?)),
            None => Ok(cli),
        }
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Settings, toml::de::Error> {
        toml::from_str(text)
    }

    /// Each setting from `self` where set, else from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            config: self.config.or(lower.config),
            model_repository: self.model_repository.or(lower.model_repository),
            host: self.host.or(lower.host),
            grpc_port: self.grpc_port.or(lower.grpc_port),
            http_port: self.http_port.or(lower.http_port),
            metrics_port: self.metrics_port.or(lower.metrics_port),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
            intra_op_threads: self.intra_op_threads.or(lower.intra_op_threads),
            shutdown_grace_period_secs: self
                .shutdown_grace_period_secs
                .or(lower.shutdown_grace_period_secs),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            max_request_bytes_in_flight: self
                .max_request_bytes_in_flight
                .or(lower.max_request_bytes_in_flight),
            max_connections: self.max_connections.or(lower.max_connections),
            max_http_connections: self.max_http_connections.or(lower.max_http_connections),
            max_concurrent_streams: self.max_concurrent_streams.or(lower.max_concurrent_streams),
            max_header_list_bytes: self.max_header_list_bytes.or(lower.max_header_list_bytes),
            http2_max_pending_reset_streams: self
                .http2_max_pending_reset_streams
                .or(lower.http2_max_pending_reset_streams),
            http2_keepalive_interval_secs: self
                .http2_keepalive_interval_secs
                .or(lower.http2_keepalive_interval_secs),
            http2_keepalive_timeout_secs: self
                .http2_keepalive_timeout_secs
                .or(lower.http2_keepalive_timeout_secs),
            idle_connection_timeout_secs: self
                .idle_connection_timeout_secs
                .or(lower.idle_connection_timeout_secs),
            body_read_timeout_secs: self.body_read_timeout_secs.or(lower.body_read_timeout_secs),
            header_read_timeout_secs: self
                .header_read_timeout_secs
                .or(lower.header_read_timeout_secs),
            min_instances: self.min_instances.or(lower.min_instances),
            idle_timeout_secs: self.idle_timeout_secs.or(lower.idle_timeout_secs),
            max_execution_secs: self.max_execution_secs.or(lower.max_execution_secs),
            model_control_mode: self.model_control_mode.or(lower.model_control_mode),
            load_model: self.load_model.or(lower.load_model),
            model_control_token: self.model_control_token.or(lower.model_control_token),
            model_control_token_file: self
                .model_control_token_file
                .or(lower.model_control_token_file),
            allow_unauthenticated_model_control: self
                .allow_unauthenticated_model_control
                .or(lower.allow_unauthenticated_model_control),
            max_model_instances: self.max_model_instances.or(lower.max_model_instances),
            max_warmup_bytes: self.max_warmup_bytes.or(lower.max_warmup_bytes),
            default_timeout_ms: self.default_timeout_ms.or(lower.default_timeout_ms),
            max_timeout_ms: self.max_timeout_ms.or(lower.max_timeout_ms),
            load_shedding: self.load_shedding.or(lower.load_shedding),
            max_in_flight: self.max_in_flight.or(lower.max_in_flight),
            concurrency_limit_mode: self.concurrency_limit_mode.or(lower.concurrency_limit_mode),
            min_concurrency_limit: self.min_concurrency_limit.or(lower.min_concurrency_limit),
            max_concurrency_limit: self.max_concurrency_limit.or(lower.max_concurrency_limit),
            target_queue_delay_ms: self.target_queue_delay_ms.or(lower.target_queue_delay_ms),
            retry_budget_percent: self.retry_budget_percent.or(lower.retry_budget_percent),
            retry_min_per_sec: self.retry_min_per_sec.or(lower.retry_min_per_sec),
        }
    }

    /// Fill in defaults and check every value once.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let admission = self.admission()?;
        let edge = self.edge()?;
        let control = self.model_control()?;
        let limits = self.model_limits()?;
        let config = Config {
            admission,
            edge,
            model_repository: self
                .model_repository
                .unwrap_or_else(|| PathBuf::from("models")),
            host: self.host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            grpc_port: self.grpc_port.unwrap_or(8001),
            http_port: self.http_port.unwrap_or(8000),
            metrics_port: self.metrics_port.unwrap_or(8002),
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            log_level: self.log_level.unwrap_or_else(|| "info".to_owned()),
            backend: BackendOptions {
                intra_op_threads: self.intra_op_threads,
            },
            shutdown_grace_period: Duration::from_secs(
                self.shutdown_grace_period_secs.unwrap_or(30),
            ),
            max_message_bytes: self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            models: ModelDefaults {
                min_instances: self.min_instances,
                idle_timeout: idle_timeout(self.idle_timeout_secs.unwrap_or(300.0)).map_err(
                    |message| ConfigError::Invalid {
                        setting: "idle_timeout_secs",
                        message,
                    },
                )?,
                max_execution: max_execution(self.max_execution_secs)?,
                limits,
            },
            control,
        };
        config.check()?;
        Ok(config)
    }
}

/// Default of `max_execution_secs`: far above any sane model's batch, well below what a
/// client would wait.
const DEFAULT_MAX_EXECUTION_SECS: f64 = 60.0;
/// Bounds of `max_execution_secs` when on: below a millisecond every execution would
/// count as stuck; above a day the check means nothing (and instants could overflow).
const MAX_EXECUTION_RANGE_SECS: std::ops::RangeInclusive<f64> = 0.001..=86_400.0;

/// `max_execution_secs` checked: 0 turns the check off, otherwise within the range.
fn max_execution(secs: Option<f64>) -> Result<Option<Duration>, ConfigError> {
    let secs = secs.unwrap_or(DEFAULT_MAX_EXECUTION_SECS);
    if secs == 0.0 {
        return Ok(None);
    }
    // NaN and infinities fall outside the range too.
    match secs {
        secs if MAX_EXECUTION_RANGE_SECS.contains(&secs) => Ok(Some(Duration::from_secs_f64(secs))),
        secs => Err(ConfigError::Invalid {
            setting: "max_execution_secs",
            message: format!(
                "{secs} is not 0 (off) or a number of seconds from {} to {}",
                MAX_EXECUTION_RANGE_SECS.start(),
                MAX_EXECUTION_RANGE_SECS.end()
            ),
        }),
    }
}

impl Settings {
    /// The edge limits, each checked on its own; how they relate to other settings is
    /// checked in [`Config::check`].
    fn edge(&self) -> Result<EdgeLimits, ConfigError> {
        let d = EdgeLimits::default();
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let count = |v: Option<usize>, default: usize, setting| match v {
            Some(0) => Err(invalid(setting, "must be at least 1".to_owned())),
            v => Ok(v.unwrap_or(default)),
        };
        let secs = |v: Option<u64>, default: Duration, setting| match v {
            None => Ok(default),
            Some(s) if (1..=MAX_EDGE_SECS).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => Err(invalid(
                setting,
                format!("{s} is not within 1..={MAX_EDGE_SECS} seconds"),
            )),
        };
        let max_concurrent_streams = self
            .max_concurrent_streams
            .unwrap_or(d.max_concurrent_streams);
        if !(1..=65_536).contains(&max_concurrent_streams) {
            return Err(invalid(
                "max_concurrent_streams",
                format!("{max_concurrent_streams} is not within 1..=65536"),
            ));
        }
        let max_header_list_bytes = self
            .max_header_list_bytes
            .unwrap_or(d.max_header_list_bytes);
        if !(1024..=1 << 20).contains(&max_header_list_bytes) {
            return Err(invalid(
                "max_header_list_bytes",
                format!("{max_header_list_bytes} is not within 1024..=1048576"),
            ));
        }
        Ok(EdgeLimits {
            max_request_bytes_in_flight: count(
                self.max_request_bytes_in_flight,
                d.max_request_bytes_in_flight,
                "max_request_bytes_in_flight",
            )?,
            max_connections: count(self.max_connections, d.max_connections, "max_connections")?,
            max_http_connections: count(
                self.max_http_connections,
                d.max_http_connections,
                "max_http_connections",
            )?,
            max_concurrent_streams,
            max_header_list_bytes,
            http2_max_pending_reset_streams: count(
                self.http2_max_pending_reset_streams,
                d.http2_max_pending_reset_streams,
                "http2_max_pending_reset_streams",
            )?,
            keepalive_interval: secs(
                self.http2_keepalive_interval_secs,
                d.keepalive_interval,
                "http2_keepalive_interval_secs",
            )?,
            keepalive_timeout: secs(
                self.http2_keepalive_timeout_secs,
                d.keepalive_timeout,
                "http2_keepalive_timeout_secs",
            )?,
            idle_connection_timeout: secs(
                self.idle_connection_timeout_secs,
                d.idle_connection_timeout,
                "idle_connection_timeout_secs",
            )?,
            body_read_timeout: secs(
                self.body_read_timeout_secs,
                d.body_read_timeout,
                "body_read_timeout_secs",
            )?,
            header_read_timeout: secs(
                self.header_read_timeout_secs,
                d.header_read_timeout,
                "header_read_timeout_secs",
            )?,
        })
    }

    /// Who may load and unload models. Explicit mode needs a token unless the operator
    /// opts out in so many words: an open control port lets anyone replace every model.
    fn model_control(&self) -> Result<ModelControl, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let mode = self.model_control_mode.unwrap_or(ModelControlMode::None);
        let token = match (&self.model_control_token, &self.model_control_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "model_control_token_file",
                    "set either model_control_token or model_control_token_file, not both"
                        .to_owned(),
                ))
            }
            (Some(token), None) => {
                Some(check_token(token).map_err(|m| invalid("model_control_token", m))?)
            }
            (None, Some(path)) => {
                Some(read_token_file(path).map_err(|m| invalid("model_control_token_file", m))?)
            }
            (None, None) => None,
        };
        let open = self.allow_unauthenticated_model_control.unwrap_or(false);
        if mode == ModelControlMode::Explicit && token.is_none() && !open {
            return Err(invalid(
                "model_control_mode",
                "explicit without a token would let anyone who reaches the gRPC port load and \
                 unload models: set model_control_token or model_control_token_file, or accept \
                 that with allow_unauthenticated_model_control = true \
                 (--allow-unauthenticated-model-control true)"
                    .to_owned(),
            ));
        }
        Ok(ModelControl {
            mode,
            load_models: self.load_model.clone().unwrap_or_default(),
            token,
        })
    }

    fn model_limits(&self) -> Result<ModelLimits, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let defaults = ModelLimits::default();
        let max_model_instances = self
            .max_model_instances
            .unwrap_or(defaults.max_model_instances);
        if !(1..=MAX_MODEL_INSTANCES_CEILING).contains(&max_model_instances) {
            return Err(invalid(
                "max_model_instances",
                format!("{max_model_instances} is not within 1..={MAX_MODEL_INSTANCES_CEILING}"),
            ));
        }
        let max_warmup_bytes = match self.max_warmup_bytes {
            None => defaults.max_warmup_bytes,
            Some(0) => {
                return Err(invalid(
                    "max_warmup_bytes",
                    "must be at least 1 (every model warms up)".to_owned(),
                ))
            }
            Some(bytes) => usize::try_from(bytes).map_err(|_| {
                invalid(
                    "max_warmup_bytes",
                    format!("{bytes} does not fit this machine's address space"),
                )
            })?,
        };
        Ok(ModelLimits {
            max_model_instances,
            max_warmup_bytes,
        })
    }

    fn admission(&self) -> Result<AdmissionConfig, ConfigError> {
        let defaults = AdmissionConfig::default();
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let millis = |ms: Option<u64>, setting| match ms {
            Some(0) => Err(invalid(setting, "must be above 0 ms".to_owned())),
            ms => Ok(ms.map(Duration::from_millis)),
        };
        let model_limit = LimitConfig {
            mode: self
                .concurrency_limit_mode
                .unwrap_or(defaults.model_limit.mode),
            min: self
                .min_concurrency_limit
                .unwrap_or(defaults.model_limit.min),
            max: self
                .max_concurrency_limit
                .unwrap_or(defaults.model_limit.max),
            target: match self.target_queue_delay_ms {
                None => None,
                Some(ms) if ms.is_finite() && ms > 0.0 && ms / 1e3 <= MAX_TIMEOUT_SECS_F64 => {
                    Some(Duration::from_secs_f64(ms / 1e3))
                }
                Some(ms) => {
                    return Err(invalid(
                        "target_queue_delay_ms",
                        format!("{ms} is not a positive number of milliseconds"),
                    ))
                }
            },
        };
        if model_limit.min == 0 {
            return Err(invalid(
                "min_concurrency_limit",
                "must be at least 1".to_owned(),
            ));
        }
        if model_limit.max < model_limit.min {
            return Err(invalid(
                "max_concurrency_limit",
                format!(
                    "{} is below min_concurrency_limit {}",
                    model_limit.max, model_limit.min
                ),
            ));
        }
        let max_in_flight = self.max_in_flight.unwrap_or(defaults.max_in_flight);
        if max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1".to_owned()));
        }
        let percent = self
            .retry_budget_percent
            .unwrap_or(defaults.retry.percent * 100.0);
        if !(0.0..=1000.0).contains(&percent) {
            return Err(invalid(
                "retry_budget_percent",
                format!("{percent} is not within 0..=1000"),
            ));
        }
        Ok(AdmissionConfig {
            deadline: DeadlinePolicy {
                default: millis(self.default_timeout_ms, "default_timeout_ms")?,
                max: millis(self.max_timeout_ms, "max_timeout_ms")?,
            },
            shedding: self.load_shedding.unwrap_or(defaults.shedding),
            max_in_flight,
            model_limit,
            retry: RetryBudget {
                percent: percent / 100.0,
                min_per_sec: self.retry_min_per_sec.unwrap_or(defaults.retry.min_per_sec),
                ..defaults.retry
            },
        })
    }
}

/// Longest idle timeout, server-wide or in a model's `idle_timeout_secs` parameter: one
/// year. The pool adds it to points in time, which must not overflow.
pub const MAX_IDLE_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// An idle timeout in seconds, checked: positive, finite, at most a year.
pub fn idle_timeout(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_IDLE_TIMEOUT_SECS {
        Duration::try_from_secs_f64(secs).map_err(|e| format!("{secs}: {e}"))
    } else {
        Err(format!(
            "{secs} is not a positive number of seconds up to {MAX_IDLE_TIMEOUT_SECS} (a year)"
        ))
    }
}

/// A token as given: it must be sendable as `authorization: Bearer <token>`, so visible
/// ASCII without spaces, and not empty (an empty token would silently mean "none").
fn check_token(token: &str) -> Result<String, String> {
    if token.trim().is_empty() {
        return Err("is empty: give a token, or leave the setting out".to_owned());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "is {} bytes long, above {MAX_TOKEN_BYTES}",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "may hold only visible ASCII characters without spaces (it is sent in a header)"
                .to_owned(),
        );
    }
    Ok(token.to_owned())
}

/// The token from a file such as a mounted Secret; the line end editors and `echo` add is
/// not part of it. The size is checked before reading.
fn read_token_file(path: &Path) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let size = std::fs::metadata(path).map_err(fail)?.len();
    // Room for the token and a CRLF.
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "{} holds {size} bytes, more than a token of at most {MAX_TOKEN_BYTES}",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(fail)?;
    let token = text.trim_end_matches(['\n', '\r']);
    if token.trim().is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    check_token(token).map_err(|m| format!("the token in {} {m}", path.display()))
}

impl Config {
    /// Settings that are valid but work against each other, one sentence each, for the
    /// start-up log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let streams = self.edge.max_concurrent_streams as usize;
        if self.admission.shedding && streams <= self.admission.model_limit.max {
            warnings.push(format!(
                "max_concurrent_streams {streams} is not above max_concurrency_limit {}: a \
                 client on one connection that offers more than a model takes queues in its own \
                 HTTP/2 layer until its deadline instead of being refused at once",
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
        if self.control.mode == ModelControlMode::None && !self.control.load_models.is_empty() {
            return invalid(
                "load_model",
                "needs model_control_mode explicit (in mode none every model loads)".to_owned(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return invalid("log_level", format!("'{}': {e}", self.log_level));
        }
        Ok(())
    }
}

impl Settings {
    fn validate_unchecked(self) -> Config {
        let dir = self.model_repository.clone();
        match self.validate() {
            Ok(c) => c,
            Err(e) => panic!("test configuration for {dir:?} must be valid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn by_default_one_connection_can_offer_more_than_a_model_takes() {
        let dir = repo();
        let config = Config::for_repository(dir.path());
        assert!(
            config.edge.max_concurrent_streams as usize > config.admission.model_limit.max,
            "a single-connection client must reach the model's limit, not queue in HTTP/2"
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());

        let config = Settings {
            model_repository: Some(dir.path().into()),
            max_concurrent_streams: Some(64),
            max_concurrency_limit: Some(64),
            ..Settings::default()
        }
        .validate_unchecked();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("max_concurrent_streams 64"),
            "{warnings:?}"
        );

        // Without shedding there is no limit to reach: nothing to warn about.
        let config = Settings {
            model_repository: Some(dir.path().into()),
            max_concurrent_streams: Some(64),
            load_shedding: Some(false),
            ..Settings::default()
        }
        .validate_unchecked();
        assert!(config.warnings().is_empty());
    }

    /// The configuration from these flags alone, serving `dir`.
    fn from_command_line(dir: &Path, flags: &[&str]) -> Config {
        let cli = Settings::try_parse_from(std::iter::once("sluice").chain(flags.iter().copied()))
            .unwrap();
        Settings {
            model_repository: Some(dir.into()),
            ..cli
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn defaults_are_tritons_ports_on_loopback() {
        let dir = repo();
        let c = Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(
            (c.http_port, c.grpc_port, c.metrics_port),
            (8000, 8001, 8002)
        );
        assert_eq!(c.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(c.shutdown_grace_period, Duration::from_secs(30));
    }

    #[test]
    fn command_line_wins_over_file() {
        let dir = repo();
        let file = Settings::from_toml("grpc_port = 9001\nhttp_port = 9000\nlog_format = \"json\"")
            .unwrap();
        let cli = Settings::try_parse_from(["sluice", "--grpc-port", "7001"]).unwrap();
        let c = Settings {
            model_repository: Some(dir.path().into()),
            ..cli.or(file)
        }
        .validate()
        .unwrap();
        assert_eq!(c.grpc_port, 7001);
        assert_eq!(c.http_port, 9000);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn model_control_settings() {
        let dir = repo();
        let c = from_command_line(
            dir.path(),
            &[
                "--model-control-mode",
                "explicit",
                "--model-control-token",
                "t0ken",
                "--load-model",
                "a,b",
                "--load-model",
                "c",
                "--min-instances",
                "0",
                "--idle-timeout-secs",
                "2.5",
            ],
        );
        assert_eq!(c.control.mode, ModelControlMode::Explicit);
        assert_eq!(c.control.load_models, vec!["a", "b", "c"]);
        assert_eq!(c.models.min_instances, Some(0));
        assert_eq!(c.models.idle_timeout, Duration::from_millis(2500));
        let file = Settings::from_toml("model_control_mode = \"explicit\"\nload_model = [\"mlp\"]\nmodel_control_token = \"s3cret\"").unwrap();
        let c = Settings {
            model_repository: Some(dir.path().into()),
            ..file
        }
        .validate()
        .unwrap();
        assert_eq!(
            (c.control.load_models.clone(), c.control.token.as_deref()),
            (vec!["mlp".to_owned()], Some("s3cret"))
        );

        let base = || Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        };
        let err = Settings {
            load_model: Some(vec!["x".into()]),
            ..base()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("explicit"), "{err}");
        for secs in [0.0, -1.0, f64::NAN, 1e300, MAX_IDLE_TIMEOUT_SECS * 2.0] {
            let err = Settings {
                idle_timeout_secs: Some(secs),
                ..base()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(err.contains("idle_timeout_secs"), "{err}");
        }
    }

    #[test]
    fn explicit_model_control_needs_a_token_or_the_opt_in() {
        let dir = repo();
        let explicit = || Settings {
            model_repository: Some(dir.path().into()),
            model_control_mode: Some(ModelControlMode::Explicit),
            ..Default::default()
        };
        let refused = |settings: Settings, setting: &str| {
            let err = settings.validate().unwrap_err();
            let ConfigError::Invalid { setting: named, .. } = &err else {
                panic!("expected an invalid {setting}, got {err}");
            };
            assert_eq!(*named, setting, "{err}");
            err.to_string()
        };
        let err = refused(explicit(), "model_control_mode");
        assert!(err.contains("allow_unauthenticated_model_control"), "{err}");
        let err = refused(
            Settings {
                allow_unauthenticated_model_control: Some(false),
                ..explicit()
            },
            "model_control_mode",
        );
        assert!(err.contains("model_control_token"), "{err}");

        let open = Settings {
            allow_unauthenticated_model_control: Some(true),
            ..explicit()
        }
        .validate()
        .unwrap();
        assert_eq!(
            (open.control.mode, open.control.token),
            (ModelControlMode::Explicit, None)
        );
        // Mode none needs no token: nothing can be loaded or unloaded.
        assert!(Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        }
        .validate()
        .is_ok());

        for bad in [
            "",
            "   ",
            "\t\n",
            "two words",
            "caf\u{e9}",
            &"x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            refused(
                Settings {
                    model_control_token: Some(bad.to_owned()),
                    ..explicit()
                },
                "model_control_token",
            );
        }
        let c = Settings {
            model_control_token: Some("s3cret".into()),
            ..explicit()
        }
        .validate()
        .unwrap();
        assert_eq!(c.control.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn model_control_token_from_a_file() {
        let dir = repo();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let settings = |path: PathBuf| Settings {
            model_repository: Some(dir.path().into()),
            model_control_mode: Some(ModelControlMode::Explicit),
            model_control_token_file: Some(path),
            ..Default::default()
        };
        for (name, text) in [
            ("lf", "s3cret\n"),
            ("crlf", "s3cret\r\n"),
            ("bare", "s3cret"),
        ] {
            let c = settings(file(name, text)).validate().unwrap();
            assert_eq!(c.control.token.as_deref(), Some("s3cret"), "{name}");
        }
        let toml = Settings::from_toml(&format!(
            "model_control_token_file = {:?}",
            file("toml", "t\n").display().to_string()
        ))
        .unwrap();
        assert!(toml.model_control_token_file.is_some());

        let err_of = |settings: Settings| {
            let err = settings.validate().unwrap_err();
            let ConfigError::Invalid { setting, message } = err else {
                panic!("expected an invalid token file, got {err}");
            };
            assert_eq!(setting, "model_control_token_file", "{message}");
            message
        };
        assert!(err_of(settings(file("empty", ""))).contains("is empty"));
        assert!(err_of(settings(file("newline", "\n"))).contains("is empty"));
        assert!(err_of(settings(file("two-lines", "a\nb\n"))).contains("visible ASCII"));
        let big = err_of(settings(file("big", &"x".repeat(10_000))));
        assert!(big.contains("10000 bytes"), "{big}");
        assert!(err_of(settings(dir.path().join("missing"))).contains("cannot read"));
        let both = err_of(Settings {
            model_control_token: Some("a".into()),
            ..settings(file("both", "b"))
        });
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn model_limits() {
        let dir = repo();
        let base = || Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        };
        let c = base().validate().unwrap();
        assert_eq!(c.models.limits, ModelLimits::default());
        let c = from_command_line(
            dir.path(),
            &["--max-model-instances", "8", "--max-warmup-bytes", "1024"],
        );
        assert_eq!(
            c.models.limits,
            ModelLimits {
                max_model_instances: 8,
                max_warmup_bytes: 1024
            }
        );
        let c = Settings {
            max_model_instances: Some(MAX_MODEL_INSTANCES_CEILING),
            ..base()
        }
        .validate()
        .unwrap();
        assert_eq!(
            c.models.limits.max_model_instances,
            MAX_MODEL_INSTANCES_CEILING
        );
        for (settings, setting) in [
            (
                Settings {
                    max_model_instances: Some(0),
                    ..base()
                },
                "max_model_instances",
            ),
            (
                Settings {
                    max_model_instances: Some(MAX_MODEL_INSTANCES_CEILING + 1),
                    ..base()
                },
                "max_model_instances",
            ),
            (
                Settings {
                    max_warmup_bytes: Some(0),
                    ..base()
                },
                "max_warmup_bytes",
            ),
        ] {
            let err = settings.validate().unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { setting: s, .. } if *s == setting),
                "{err}"
            );
        }
    }

    #[test]
    fn the_token_is_not_in_the_debug_form_of_the_config() {
        let control = ModelControl {
            mode: ModelControlMode::Explicit,
            load_models: vec![],
            token: Some("s3cret-value".into()),
        };
        let shown = format!("{control:?}");
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = Settings::from_toml("grpc_prot = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("grpc_prot"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let dir = repo();
        let base = || Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        };
        let err = Settings {
            grpc_port: Some(9000),
            http_port: Some(9000),
            ..base()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("http_port") && err.contains("9000"), "{err}");
        let err = Settings {
            intra_op_threads: Some(0),
            ..base()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("intra_op_threads"), "{err}");
        let err = Settings {
            model_repository: Some("/nonexistent/repo".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/repo"), "{err}");
    }

    #[test]
    fn invalid_admission_settings_are_named() {
        let dir = repo();
        let base = || Settings {
            model_repository: Some(dir.path().into()),
            ..Default::default()
        };
        let refused = |settings: Settings, setting: &str| {
            let err = settings.validate().unwrap_err();
            let ConfigError::Invalid { setting: named, .. } = &err else {
                panic!("expected an invalid {setting}, got {err}");
            };
            assert_eq!(*named, setting, "{err}");
            assert!(err.to_string().contains(setting), "{err}");
            err.to_string()
        };
        refused(
            Settings {
                min_concurrency_limit: Some(0),
                ..base()
            },
            "min_concurrency_limit",
        );
        let err = refused(
            Settings {
                min_concurrency_limit: Some(8),
                max_concurrency_limit: Some(4),
                ..base()
            },
            "max_concurrency_limit",
        );
        assert!(err.contains("min_concurrency_limit 8"), "{err}");
        refused(
            Settings {
                max_in_flight: Some(0),
                ..base()
            },
            "max_in_flight",
        );
        refused(
            Settings {
                default_timeout_ms: Some(0),
                ..base()
            },
            "default_timeout_ms",
        );
        refused(
            Settings {
                max_timeout_ms: Some(0),
                ..base()
            },
            "max_timeout_ms",
        );
        let err = refused(
            Settings {
                retry_budget_percent: Some(2000.0),
                ..base()
            },
            "retry_budget_percent",
        );
        assert!(err.contains("2000"), "{err}");
        refused(
            Settings {
                retry_budget_percent: Some(-1.0),
                ..base()
            },
            "retry_budget_percent",
        );
        refused(
            Settings {
                target_queue_delay_ms: Some(0.0),
                ..base()
            },
            "target_queue_delay_ms",
        );
        // The bounds themselves are accepted.
        let c = Settings {
            min_concurrency_limit: Some(4),
            max_concurrency_limit: Some(4),
            max_in_flight: Some(1),
            default_timeout_ms: Some(1),
            retry_budget_percent: Some(1000.0),
            ..base()
        }
        .validate()
        .unwrap();
        assert_eq!(
            (c.admission.model_limit.min, c.admission.model_limit.max),
            (4, 4)
        );
        assert_eq!(c.admission.max_in_flight, 1);
        assert_eq!(c.admission.deadline.default, Some(Duration::from_millis(1)));
        assert_eq!(c.admission.retry.percent, 10.0);
    }

    #[test]
    fn admission_settings_from_the_command_line() {
        let dir = repo();
        let c = from_command_line(
            dir.path(),
            &[
                "--concurrency-limit-mode",
                "static",
                "--max-concurrency-limit",
                "16",
                "--default-timeout-ms",
                "250",
                "--load-shedding",
                "false",
            ],
        );
        assert_eq!(c.admission.model_limit.mode, LimitMode::Static);
        assert_eq!(c.admission.model_limit.max, 16);
        assert_eq!(
            c.admission.deadline.default,
            Some(Duration::from_millis(250))
        );
        assert!(!c.admission.shedding);
    }

    #[test]
    fn max_execution_secs_defaults_to_a_minute_and_is_checked() {
        let dir = repo();
        let with = |secs: Option<f64>| {
            Settings {
                model_repository: Some(dir.path().into()),
                max_execution_secs: secs,
                ..Default::default()
            }
            .validate()
        };
        assert_eq!(
            with(None).unwrap().models.max_execution,
            Some(Duration::from_secs(60))
        );
        assert_eq!(with(Some(0.0)).unwrap().models.max_execution, None);
        assert_eq!(
            with(Some(0.2)).unwrap().models.max_execution,
            Some(Duration::from_millis(200))
        );
        // The bounds themselves are accepted.
        assert_eq!(
            with(Some(86_400.0)).unwrap().models.max_execution,
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            with(Some(0.001)).unwrap().models.max_execution,
            Some(Duration::from_millis(1))
        );
        for bad in [-1.0, 0.0005, 86_400.5, 1e300, f64::NAN, f64::INFINITY] {
            let err = with(Some(bad)).unwrap_err();
            let ConfigError::Invalid { setting, .. } = &err else {
                panic!("expected an invalid setting for {bad}, got {err}");
            };
            assert_eq!(*setting, "max_execution_secs", "{err}");
        }
        // From the command line and the file too.
        let c = from_command_line(dir.path(), &["--max-execution-secs", "2.5"]);
        assert_eq!(c.models.max_execution, Some(Duration::from_millis(2500)));
        let file = Settings::from_toml("max_execution_secs = 0").unwrap();
        assert_eq!(file.max_execution_secs, Some(0.0));
    }
}
