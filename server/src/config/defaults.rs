//! Every setting's default, in one place: the lowest layer of the merge that
//! [`Settings::validate`] applies, the `[default: …]` that `--help` shows, and what the
//! README's configuration table is checked against. Values come from the typed defaults
//! (`EdgeLimits`, `AdmissionConfig`, `ModelLimits`) so that those and the settings
//! cannot disagree.

use std::collections::BTreeMap;

use clap::CommandFactory;

use super::*;

/// The port numbers and names Triton uses.
const GRPC_PORT: u16 = 8001;
const HTTP_PORT: u16 = 8000;
const METRICS_PORT: u16 = 8002;
const SHUTDOWN_GRACE_PERIOD_SECS: u64 = 30;
const IDLE_TIMEOUT_SECS: f64 = 300.0;

impl Settings {
    /// Every setting that has a fixed default, set to it; the others (`None`) default
    /// to something that depends on the model or the machine, as their help says.
    pub fn defaults() -> Settings {
        let edge = EdgeLimits::default();
        let admission = AdmissionConfig::default();
        let limits = ModelLimits::default();
        Settings {
            config: None,
            model_repository: Some(PathBuf::from("models")),
            host: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            grpc_port: Some(GRPC_PORT),
            http_port: Some(HTTP_PORT),
            metrics_port: Some(METRICS_PORT),
            log_format: Some(LogFormat::Text),
            log_level: Some("info".to_owned()),
            intra_op_threads: None,
            shutdown_grace_period_secs: Some(SHUTDOWN_GRACE_PERIOD_SECS),
            max_message_bytes: Some(DEFAULT_MAX_MESSAGE_BYTES),
            max_request_bytes_in_flight: Some(edge.max_request_bytes_in_flight),
            max_connections: Some(edge.max_connections),
            max_http_connections: Some(edge.max_http_connections),
            max_concurrent_streams: Some(edge.max_concurrent_streams),
            max_header_list_bytes: Some(edge.max_header_list_bytes),
            http2_max_pending_reset_streams: Some(edge.http2_max_pending_reset_streams),
            http2_keepalive_interval_secs: Some(edge.keepalive_interval.as_secs()),
            http2_keepalive_timeout_secs: Some(edge.keepalive_timeout.as_secs()),
            idle_connection_timeout_secs: Some(edge.idle_connection_timeout.as_secs()),
            body_read_timeout_secs: Some(edge.body_read_timeout.as_secs()),
            header_read_timeout_secs: Some(edge.header_read_timeout.as_secs()),
            min_instances: None,
            idle_timeout_secs: Some(IDLE_TIMEOUT_SECS),
            max_execution_secs: Some(DEFAULT_MAX_EXECUTION_SECS),
            model_control_mode: Some(ModelControlMode::None),
            load_model: None,
            // 15 s in mode poll; a value given in another mode is refused, so the
            // default is applied after the merge (`repository_poll_interval`).
            repository_poll_secs: None,
            model_control_token: None,
            model_control_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            allow_unauthenticated_model_control: Some(false),
            max_model_instances: Some(limits.max_model_instances),
            max_warmup_bytes: Some(limits.max_warmup_bytes as u64),
            default_timeout_ms: None,
            max_timeout_ms: None,
            load_shedding: Some(admission.shedding),
            max_in_flight: Some(admission.max_in_flight),
            concurrency_limit_mode: Some(admission.model_limit.mode),
            min_concurrency_limit: Some(admission.model_limit.min),
            max_concurrency_limit: Some(admission.model_limit.max),
            target_queue_delay_ms: None,
            retry_budget_percent: Some(admission.retry.percent * 100.0),
            retry_min_per_sec: Some(admission.retry.min_per_sec),
        }
    }

    /// The defaults as text, by setting (TOML key, also clap's argument id).
    pub fn default_texts() -> BTreeMap<String, String> {
        let value = toml::Value::try_from(Settings::defaults()).expect("settings serialize");
        let table = value
            .as_table()
            .expect("settings serialize to a table")
            .clone();
        table
            .into_iter()
            .filter_map(|(key, value)| {
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) if f.fract() == 0.0 => format!("{f:.0}"),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    // Lists (load_model) have no default to show; nothing else occurs.
                    toml::Value::Array(_) | toml::Value::Table(_) | toml::Value::Datetime(_) => {
                        return None
                    }
                };
                Some((key, text))
            })
            .collect()
    }

    /// The command line, each setting's help ending in its default.
    pub fn command_with_defaults() -> clap::Command {
        let mut command = Settings::command();
        for (key, text) in Settings::default_texts() {
            command = command.mut_arg(key.as_str(), |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {text}]"))
            });
        }
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn help_shows_each_default_once_from_the_one_source() {
        let defaults = Settings::default_texts();
        assert_eq!(defaults["max_concurrent_streams"], "256");
        assert_eq!(defaults["grpc_port"], "8001");
        assert_eq!(defaults["idle_timeout_secs"], "300");
        assert_eq!(defaults["concurrency_limit_mode"], "adaptive");
        let command = Settings::command_with_defaults();
        for arg in command.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let id = arg.get_id().as_str();
            let shown = help.matches("[default:").count();
            match defaults.get(id) {
                Some(text) => {
                    assert_eq!(shown, 1, "{id}: {help}");
                    assert!(
                        help.ends_with(&format!("[default: {text}]")),
                        "{id}: {help}"
                    );
                }
                // Defaults that depend on the model or the machine are described in words.
                None => assert!(shown <= 1, "{id}: {help}"),
            }
        }
    }

    #[test]
    fn validated_defaults_are_the_one_source() {
        let dir = repo();
        let config = Config::for_repository(dir.path());
        let defaults = Settings::defaults();
        assert_eq!(
            config.edge.max_concurrent_streams,
            defaults.max_concurrent_streams.unwrap()
        );
        assert_eq!(
            config.admission.model_limit.max,
            defaults.max_concurrency_limit.unwrap()
        );
        assert_eq!(
            config.shutdown_grace_period.as_secs(),
            defaults.shutdown_grace_period_secs.unwrap()
        );
        assert_eq!(
            config.models.idle_timeout.as_secs_f64(),
            defaults.idle_timeout_secs.unwrap()
        );
    }

    /// The README's configuration table: its default column against [`Settings::defaults`].
    #[test]
    fn the_readme_table_shows_the_defaults() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let defaults = Settings::default_texts();
        let mut checked = 0;
        for line in readme.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (key, shown) = (cells[3].trim_matches('`'), cells[4].trim_matches('`'));
            if let Some(text) = defaults.get(key) {
                assert_eq!(shown, text, "README's default for {key}");
                checked += 1;
            }
        }
        assert_eq!(
            checked,
            defaults.len(),
            "every default is in the README's table"
        );
    }
}
