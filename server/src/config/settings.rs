//! The settings as given: every field optional, from flags, `SLUICE_*` variables or a TOML
//! file, merged highest first. Defaults and checks are applied once, in [`validate`].

use super::*;

/// Every setting, as given by one source. `None` means "not set here".
///
/// The same struct is the command line (with `--help`) and the TOML file schema, so the
/// two cannot drift apart; TOML keys are the flag names in snake_case.
#[derive(Debug, Default, Clone, Parser, Deserialize, serde::Serialize)]
#[command(name = "sluice", version, long_about = None, about = "Model-serving gRPC gateway for TorchScript models (KServe v2 / Triton protocol)")]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of the settings below (keys in snake_case, e.g. `grpc_port = 8001`).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Model repository in Triton's layout: `<dir>/<model>/config.pbtxt` and
    /// `<dir>/<model>/<version>/model.pt`.
    #[arg(long, env = "SLUICE_MODEL_REPOSITORY", value_name = "DIR")]
    pub model_repository: Option<PathBuf>,

    /// Address to listen on for gRPC, HTTP and metrics. Use 0.0.0.0 in containers.
    #[arg(long, env = "SLUICE_HOST", value_name = "ADDR")]
    pub host: Option<IpAddr>,

    /// gRPC port (KServe v2 inference, grpc.health.v1, reflection); 0 picks a free port.
    #[arg(long, env = "SLUICE_GRPC_PORT", value_name = "PORT")]
    pub grpc_port: Option<u16>,

    /// HTTP port: the KServe v2 REST protocol (health, metadata, inference, repository).
    #[arg(long, env = "SLUICE_HTTP_PORT", value_name = "PORT")]
    pub http_port: Option<u16>,

    /// Prometheus metrics port (/metrics).
    #[arg(long, env = "SLUICE_METRICS_PORT", value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// Log line format: `text` or `json`.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `sluice=debug,tower=warn`.
    #[arg(long, env = "SLUICE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// libtorch intra-op threads per model instance. [default: the machine's cores
    /// shared among the model's instances: cores / instance count, at least 1; one
    /// once a full batch computes in under 250 us]
    #[arg(long, env = "SLUICE_INTRA_OP_THREADS", value_name = "N")]
    pub intra_op_threads: Option<usize>,

    /// Seconds to finish in-flight work after SIGTERM/SIGINT before exiting.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_PERIOD_SECS", value_name = "SECS")]
    pub shutdown_grace_period_secs: Option<u64>,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "SLUICE_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Request bytes being received and decoded in the whole server, from each message's
    /// gRPC header until its call is answered; a message that does not fit is refused
    /// UNAVAILABLE at once. At least max_message_bytes.
    #[arg(long, env = "SLUICE_MAX_REQUEST_BYTES_IN_FLIGHT", value_name = "BYTES")]
    pub max_request_bytes_in_flight: Option<usize>,

    /// Open gRPC connections; more are closed as soon as they are accepted.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Open connections on each HTTP/1 port (REST, metrics); more are closed as soon as
    /// they are accepted.
    #[arg(long, env = "SLUICE_MAX_HTTP_CONNECTIONS", value_name = "N")]
    pub max_http_connections: Option<usize>,

    /// HTTP/2 streams (calls) open at once on one gRPC connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// clients queue beyond it, where no limit of the server can refuse their calls, so
    /// keep it at least max_concurrency_limit.
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<u32>,

    /// Largest header block (metadata) of one gRPC call, in bytes.
    #[arg(long, env = "SLUICE_MAX_HEADER_LIST_BYTES", value_name = "BYTES")]
    pub max_header_list_bytes: Option<u32>,

    /// Streams a gRPC client may reset before the server reads them, per connection;
    /// past it the connection is closed (HTTP/2 rapid-reset protection).
    #[arg(long, env = "SLUICE_HTTP2_MAX_PENDING_RESET_STREAMS", value_name = "N")]
    pub http2_max_pending_reset_streams: Option<usize>,

    /// Seconds between HTTP/2 keepalive pings on a gRPC connection.
    #[arg(
        long,
        env = "SLUICE_HTTP2_KEEPALIVE_INTERVAL_SECS",
        value_name = "SECS"
    )]
    pub http2_keepalive_interval_secs: Option<u64>,

    /// Seconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "SLUICE_HTTP2_KEEPALIVE_TIMEOUT_SECS", value_name = "SECS")]
    pub http2_keepalive_timeout_secs: Option<u64>,

    /// Seconds a connection (gRPC or HTTP/1) may stay open without a call in progress
    /// before the server closes it.
    #[arg(long, env = "SLUICE_IDLE_CONNECTION_TIMEOUT_SECS", value_name = "SECS")]
    pub idle_connection_timeout_secs: Option<u64>,

    /// Seconds within which a gRPC request message must arrive in full, counted from the
    /// call's headers (unary) or the message's first bytes (streams); a slower body is
    /// answered DEADLINE_EXCEEDED and its buffer freed.
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT_SECS", value_name = "SECS")]
    pub body_read_timeout_secs: Option<u64>,

    /// Seconds within which an HTTP/1 request's headers must arrive.
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_SECS", value_name = "SECS")]
    pub header_read_timeout_secs: Option<u64>,

    /// Instances each model keeps loaded however idle, for models whose config has no
    /// `min_instances` parameter; 0 lets idle models scale to zero. [default: each model's
    /// instance_group count, i.e. no scaling]
    #[arg(long, env = "SLUICE_MIN_INSTANCES", value_name = "N")]
    pub min_instances: Option<usize>,

    /// Seconds an instance may stay idle before it is unloaded (down to the minimum), for
    /// models whose config has no `idle_timeout_secs` parameter.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub idle_timeout_secs: Option<f64>,

    /// Longest one execution (one batch's forward) may run, in seconds. An instance still
    /// running past it is stuck: its requests are answered INTERNAL, it gets no more work
    /// and a replacement is loaded while the model has fewer than instance_group count
    /// stuck threads; when every instance is stuck and none can be replaced, liveness
    /// turns false. 0 turns the check off (a hung model then holds its requests until
    /// their deadlines). At most 86400.
    #[arg(long, env = "SLUICE_MAX_EXECUTION_SECS", value_name = "SECS")]
    pub max_execution_secs: Option<f64>,

    /// `none`: load every model at start-up, no load/unload RPCs. `explicit`: load only
    /// `--load-model` models at start-up; RepositoryModelLoad/Unload manage the rest.
    /// `poll`: load every model at start-up, then follow the repository: models whose
    /// directories appear, change or go are loaded, reloaded or unloaded (every
    /// `--repository-poll-secs`); no load/unload RPCs.
    #[arg(long, env = "SLUICE_MODEL_CONTROL_MODE", value_name = "MODE")]
    pub model_control_mode: Option<ModelControlMode>,

    /// With `--model-control-mode poll`: seconds between two scans of the repository
    /// (1..=86400); refused in the other modes. [default: 15, in mode poll]
    #[arg(long, env = "SLUICE_REPOSITORY_POLL_SECS", value_name = "SECS")]
    pub repository_poll_secs: Option<u64>,

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

    /// PEM certificate chain for TLS on the gRPC and HTTP ports (with `--tls-key-file`).
    /// The files are read again when they change: the next connection gets the new
    /// certificate, open connections keep theirs. [default: none, plain TCP]
    #[arg(long, env = "SLUICE_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert-file`.
    #[arg(long, env = "SLUICE_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM certificates of the CAs whose client certificates are accepted: mutual TLS,
    /// a client without a certificate signed by one of them is refused. [default: none]
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA_FILE", value_name = "FILE")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Let `--model-control-mode explicit` run without a token, so that anyone who reaches
    /// the gRPC port can load and unload models. Without this, explicit mode with no token
    /// refuses to start.
    #[arg(
        long,
        env = "SLUICE_ALLOW_UNAUTHENTICATED_MODEL_CONTROL",
        value_name = "BOOL"
    )]
    pub allow_unauthenticated_model_control: Option<bool>,

    /// Most instances (threads) one model may run: its instance_group counts summed, times
    /// the versions it serves. A config asking for more is not loaded.
    #[arg(long, env = "SLUICE_MAX_MODEL_INSTANCES", value_name = "N")]
    pub max_model_instances: Option<usize>,

    /// Most bytes of warm-up data one model may hold (all its warm-up samples together,
    /// including the default zero-filled ones). A config asking for more is not loaded.
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
    /// model's max_queue_size bounds waiting requests.
    #[arg(long, env = "SLUICE_LOAD_SHEDDING", value_name = "BOOL")]
    pub load_shedding: Option<bool>,

    /// Inference requests in flight in the whole server; more are refused UNAVAILABLE.
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,

    /// Per-model concurrency limit: `adaptive` (follows the model's queue delay between
    /// the min and max) or `static` (always the max).
    #[arg(long, env = "SLUICE_CONCURRENCY_LIMIT_MODE", value_name = "MODE")]
    pub concurrency_limit_mode: Option<LimitMode>,

    /// Lowest per-model concurrency limit.
    #[arg(long, env = "SLUICE_MIN_CONCURRENCY_LIMIT", value_name = "N")]
    pub min_concurrency_limit: Option<usize>,

    /// Highest per-model concurrency limit (and its start value).
    #[arg(long, env = "SLUICE_MAX_CONCURRENCY_LIMIT", value_name = "N")]
    pub max_concurrency_limit: Option<usize>,

    /// Queue delay the adaptive limit allows beyond the model's own
    /// `max_queue_delay_microseconds`, in milliseconds. [default: four of the model's
    /// fastest measured single-sample executions, at least 1 ms]
    #[arg(long, env = "SLUICE_TARGET_QUEUE_DELAY_MS", value_name = "MS")]
    pub target_queue_delay_ms: Option<f64>,

    /// Retries of transient failures allowed, as a percentage of recent requests (on
    /// top of the minimum per second).
    #[arg(long, env = "SLUICE_RETRY_BUDGET_PERCENT", value_name = "PERCENT")]
    pub retry_budget_percent: Option<f32>,

    /// Retries of transient failures always allowed per second.
    #[arg(long, env = "SLUICE_RETRY_MIN_PER_SEC", value_name = "N")]
    pub retry_min_per_sec: Option<u32>,
}

impl Settings {
    /// Settings from the command line and environment, merged over the config file they name.
    pub fn load() -> Result<Settings, ConfigError> {
        let matches = Settings::command_with_defaults().get_matches();
        let cli = <Settings as clap::FromArgMatches>::from_arg_matches(&matches)
            .unwrap_or_else(|e| e.exit());
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
    // Kept whole: one line per setting; split, a setting could be left out of the merge.
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
            repository_poll_secs: self.repository_poll_secs.or(lower.repository_poll_secs),
            model_control_token: self.model_control_token.or(lower.model_control_token),
            model_control_token_file: self
                .model_control_token_file
                .or(lower.model_control_token_file),
            allow_unauthenticated_model_control: self
                .allow_unauthenticated_model_control
                .or(lower.allow_unauthenticated_model_control),
            tls_cert_file: self.tls_cert_file.or(lower.tls_cert_file),
            tls_key_file: self.tls_key_file.or(lower.tls_key_file),
            tls_client_ca_file: self.tls_client_ca_file.or(lower.tls_client_ca_file),
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

    /// Fill in the defaults ([`Settings::defaults`], the lowest layer) and check every
    /// value once.
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.or(Settings::defaults()).validate_merged()
    }

    fn validate_merged(self) -> Result<Config, ConfigError> {
        let admission = self.admission()?;
        let edge = self.edge()?;
        let control = self.model_control()?;
        let repository_poll_interval = self.repository_poll_interval()?;
        let limits = self.model_limits()?;
        let tls = self.tls()?;
        let config = Config {
            tls,
            admission,
            edge,
            model_repository: set(self.model_repository),
            host: set(self.host),
            grpc_port: set(self.grpc_port),
            http_port: set(self.http_port),
            metrics_port: set(self.metrics_port),
            log_format: set(self.log_format),
            log_level: set(self.log_level),
            backend: BackendOptions {
                intra_op_threads: self.intra_op_threads,
            },
            shutdown_grace_period: Duration::from_secs(set(self.shutdown_grace_period_secs)),
            max_message_bytes: set(self.max_message_bytes),
            models: ModelDefaults {
                min_instances: self.min_instances,
                idle_timeout: idle_timeout(set(self.idle_timeout_secs)).map_err(|message| {
                    ConfigError::Invalid {
                        setting: "idle_timeout_secs",
                        message,
                    }
                })?,
                max_execution: max_execution(self.max_execution_secs)?,
                limits,
            },
            control,
            repository_poll_interval,
        };
        config.check()?;
        Ok(config)
    }
}
