//! Settings -> [`Config`]: every default applied and every value checked, once.

use super::*;

/// Default of `max_execution_secs`: far above any sane model's batch, well below what a
/// client would wait.
pub(super) const DEFAULT_MAX_EXECUTION_SECS: f64 = 60.0;

/// Bounds of `max_execution_secs` when on: below a millisecond every execution would
/// count as stuck; above a day the check means nothing (and instants could overflow).
pub(super) const MAX_EXECUTION_RANGE_SECS: std::ops::RangeInclusive<f64> = 0.001..=86_400.0;

/// `max_execution_secs` checked: 0 turns the check off, otherwise within the range.
pub(super) fn max_execution(secs: Option<f64>) -> Result<Option<Duration>, ConfigError> {
    let secs = set(secs);
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

/// A setting's value after [`Settings::validate`] merged the defaults under it: every
/// setting with a fixed default is set by then.
pub(super) fn set<T>(value: Option<T>) -> T {
    value.expect("Settings::defaults sets every setting with a fixed default")
}

impl Settings {
    /// The edge limits, each checked on its own; how they relate to other settings is
    /// checked in [`Config::check`].
    // Kept whole: one check per edge setting, in the order of the README's table.
    pub(super) fn edge(&self) -> Result<EdgeLimits, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let count = |v: Option<usize>, setting| match set(v) {
            0 => Err(invalid(setting, "must be at least 1".to_owned())),
            n => Ok(n),
        };
        let secs = |v: Option<u64>, setting| match set(v) {
            s if (1..=MAX_EDGE_SECS).contains(&s) => Ok(Duration::from_secs(s)),
            s => Err(invalid(
                setting,
                format!("{s} is not within 1..={MAX_EDGE_SECS} seconds"),
            )),
        };
        let max_concurrent_streams = set(self.max_concurrent_streams);
        if !(1..=65_536).contains(&max_concurrent_streams) {
            return Err(invalid(
                "max_concurrent_streams",
                format!("{max_concurrent_streams} is not within 1..=65536"),
            ));
        }
        let max_header_list_bytes = set(self.max_header_list_bytes);
        if !(1024..=1 << 20).contains(&max_header_list_bytes) {
            return Err(invalid(
                "max_header_list_bytes",
                format!("{max_header_list_bytes} is not within 1024..=1048576"),
            ));
        }
        Ok(EdgeLimits {
            max_request_bytes_in_flight: count(
                self.max_request_bytes_in_flight,
                "max_request_bytes_in_flight",
            )?,
            max_connections: count(self.max_connections, "max_connections")?,
            max_http_connections: count(self.max_http_connections, "max_http_connections")?,
            max_concurrent_streams,
            max_header_list_bytes,
            http2_max_pending_reset_streams: count(
                self.http2_max_pending_reset_streams,
                "http2_max_pending_reset_streams",
            )?,
            keepalive_interval: secs(
                self.http2_keepalive_interval_secs,
                "http2_keepalive_interval_secs",
            )?,
            keepalive_timeout: secs(
                self.http2_keepalive_timeout_secs,
                "http2_keepalive_timeout_secs",
            )?,
            idle_connection_timeout: secs(
                self.idle_connection_timeout_secs,
                "idle_connection_timeout_secs",
            )?,
            body_read_timeout: secs(self.body_read_timeout_secs, "body_read_timeout_secs")?,
            header_read_timeout: secs(self.header_read_timeout_secs, "header_read_timeout_secs")?,
        })
    }

    /// TLS files: a certificate and its key together, client CAs only beside them.
    pub(super) fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let invalid = |setting, message: &str| ConfigError::Invalid {
            setting,
            message: message.to_owned(),
        };
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            })),
            (None, None) if self.tls_client_ca_file.is_some() => Err(invalid(
                "tls_client_ca_file",
                "mutual TLS needs the server's own tls_cert_file and tls_key_file",
            )),
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid("tls_key_file", "tls_cert_file needs tls_key_file")),
            (None, Some(_)) => Err(invalid("tls_cert_file", "tls_key_file needs tls_cert_file")),
        }
    }

    /// Who may load and unload models. Explicit mode needs a token unless the operator
    /// opts out in so many words: an open control port lets anyone replace every model.
    pub(super) fn model_control(&self) -> Result<ModelControl, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let mode = set(self.model_control_mode);
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
        let open = set(self.allow_unauthenticated_model_control);
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

    /// `repository_poll_secs`: only with mode poll (elsewhere nothing would poll, and a
    /// silently ignored setting hides a mistake), within its range; 15 s when not given.
    pub(super) fn repository_poll_interval(&self) -> Result<Duration, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            setting: "repository_poll_secs",
            message,
        };
        let mode = set(self.model_control_mode);
        match self.repository_poll_secs {
            Some(_) if mode != ModelControlMode::Poll => Err(invalid(format!(
                "needs model_control_mode poll (in mode {} the repository is not polled)",
                mode.name()
            ))),
            Some(secs) if !REPOSITORY_POLL_SECS_RANGE.contains(&secs) => Err(invalid(format!(
                "{secs} is not within {}..={} seconds",
                REPOSITORY_POLL_SECS_RANGE.start(),
                REPOSITORY_POLL_SECS_RANGE.end()
            ))),
            secs => Ok(Duration::from_secs(
                secs.unwrap_or(DEFAULT_REPOSITORY_POLL_SECS),
            )),
        }
    }

    pub(super) fn model_limits(&self) -> Result<ModelLimits, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let max_model_instances = set(self.max_model_instances);
        if !(1..=MAX_MODEL_INSTANCES_CEILING).contains(&max_model_instances) {
            return Err(invalid(
                "max_model_instances",
                format!("{max_model_instances} is not within 1..={MAX_MODEL_INSTANCES_CEILING}"),
            ));
        }
        let max_warmup_bytes = match set(self.max_warmup_bytes) {
            0 => {
                return Err(invalid(
                    "max_warmup_bytes",
                    "must be at least 1 (every model warms up)".to_owned(),
                ))
            }
            bytes => usize::try_from(bytes).map_err(|_| {
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

    // Kept whole: one check per admission setting, in the order of the README's table.
    pub(super) fn admission(&self) -> Result<AdmissionConfig, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let millis = |ms: Option<u64>, setting| match ms {
            Some(0) => Err(invalid(setting, "must be above 0 ms".to_owned())),
            ms => Ok(ms.map(Duration::from_millis)),
        };
        let model_limit = LimitConfig {
            mode: set(self.concurrency_limit_mode),
            min: set(self.min_concurrency_limit),
            max: set(self.max_concurrency_limit),
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
        let max_in_flight = set(self.max_in_flight);
        if max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1".to_owned()));
        }
        let percent = set(self.retry_budget_percent);
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
            shedding: set(self.load_shedding),
            max_in_flight,
            model_limit,
            retry: RetryBudget {
                percent: percent / 100.0,
                min_per_sec: set(self.retry_min_per_sec),
                // Not a setting.
                ttl: RetryBudget::default().ttl,
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
pub(super) fn check_token(token: &str) -> Result<String, String> {
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
pub(super) fn read_token_file(path: &Path) -> Result<String, String> {
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

impl Settings {
    pub(super) fn validate_unchecked(self) -> Config {
        let dir = self.model_repository.clone();
        match self.validate() {
            Ok(c) => c,
            Err(e) => panic!("test configuration for {dir:?} must be valid: {e}"),
        }
    }
}
