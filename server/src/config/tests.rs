//! Settings: merging, defaults, every rejection named.

use super::*;

fn repo() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn by_default_one_connection_can_fill_a_models_limit() {
    let dir = repo();
    let config = Config::for_repository(dir.path());
    assert!(
        config.edge.max_concurrent_streams as usize >= config.admission.model_limit.max,
        "a single-connection client must be able to reach the model's limit"
    );
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());

    let with = |streams, limit, shedding| {
        Settings {
            model_repository: Some(dir.path().into()),
            max_concurrent_streams: Some(streams),
            max_concurrency_limit: Some(limit),
            load_shedding: Some(shedding),
            ..Settings::default()
        }
        .validate_unchecked()
        .warnings()
    };
    let warnings = with(64, 65, true);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("max_concurrent_streams 64"),
        "{warnings:?}"
    );
    // Equal is enough: one connection can fill the limit.
    assert!(with(64, 64, true).is_empty());
    // Without shedding there is no limit to reach: nothing to warn about.
    assert!(with(64, 65, false).is_empty());
}

/// The configuration from these flags alone, serving `dir`.
fn from_command_line(dir: &Path, flags: &[&str]) -> Config {
    let cli =
        Settings::try_parse_from(std::iter::once("sluice").chain(flags.iter().copied())).unwrap();
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
    let file =
        Settings::from_toml("grpc_port = 9001\nhttp_port = 9000\nlog_format = \"json\"").unwrap();
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
// Kept whole: a table of control settings and whether each starts.
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
// Kept whole: a table of invalid settings and the message each gets.
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

#[test]
fn poll_mode_and_its_interval() {
    let dir = repo();
    let poll = |flags: &[&str]| {
        let flags = [&["--model-control-mode", "poll"], flags].concat();
        from_command_line(dir.path(), &flags).repository_poll_interval
    };
    assert_eq!(
        poll(&["--repository-poll-secs", "2"]),
        Duration::from_secs(2)
    );
    // Triton's default interval; no token needed (nothing can be loaded by request).
    assert_eq!(poll(&[]), Duration::from_secs(15));
    let toml = "model_control_mode = \"poll\"\nrepository_poll_secs = 86400";
    let c = Settings {
        model_repository: Some(dir.path().into()),
        ..Settings::from_toml(toml).unwrap()
    };
    let c = c.validate().unwrap();
    assert_eq!(c.control.mode, ModelControlMode::Poll);
    assert_eq!(c.repository_poll_interval.as_secs(), 86_400);
    let refused = |mode, secs, load: Option<Vec<String>>| {
        let settings = Settings {
            model_repository: Some(dir.path().into()),
            model_control_mode: Some(mode),
            allow_unauthenticated_model_control: Some(true),
            repository_poll_secs: secs,
            load_model: load,
            ..Default::default()
        };
        settings.validate().unwrap_err().to_string()
    };
    use ModelControlMode::{Explicit, None as Off, Poll};
    let needs = "needs model_control_mode poll (in mode";
    for (mode, secs, why) in [
        (Poll, 0, "0 is not within 1..=86400".to_owned()),
        (Poll, 86_401, "86401 is not within".to_owned()),
        (Off, 5, format!("{needs} none")),
        (Explicit, 5, format!("{needs} explicit")),
    ] {
        let err = refused(mode, Some(secs), None);
        let named = err.starts_with("invalid setting repository_poll_secs: ");
        assert!(named && err.contains(&why), "{err}");
    }
    let err = refused(Poll, None, Some(vec!["mlp".into()]));
    let why = "load_model: needs model_control_mode explicit (in mode poll";
    assert!(err.contains(why), "{err}");
}
