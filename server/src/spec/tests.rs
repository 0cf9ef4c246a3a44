//! config.pbtxt to ModelSpec, end to end: what parses, what is rejected and why.
use super::parse::colon_before_lists;
use super::warmup::warmup_file;
use super::*;

const MLP: &str = r#"
    name: "mlp"
    platform: "pytorch_libtorch"
    max_batch_size: 32
    input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
    output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] } ]
    instance_group [ { count: 2 kind: KIND_CPU } ]
    dynamic_batching { max_queue_delay_microseconds: 100 }
    parameters { key: "idle_timeout_secs" value: { string_value: "60" } }
"#;

#[test]
fn parses_a_triton_config() {
    let spec = spec_from_config(parse_text(MLP).unwrap(), "mlp").unwrap();
    assert_eq!(spec.platform, Platform::Torch);
    assert_eq!(spec.max_batch_size, 32);
    assert_eq!(spec.inputs[0].dims, vec![64]);
    assert_eq!(spec.outputs[0].dtype, DataType::Fp32);
    assert_eq!(spec.instance_count, 2);
    assert_eq!(spec.version_policy, VersionPolicy::Latest(1));
    assert_eq!(spec.parameters["idle_timeout_secs"], "60");
    assert_eq!(spec.full_dims(&spec.inputs[0].dims), vec![-1, 64]);
    assert!(spec.batching.combine);
    assert_eq!(spec.batching.max_queue_delay, Duration::from_micros(100));
    assert_eq!(spec.queue.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
}

#[test]
fn default_warm_up_covers_the_batch_sizes_the_batcher_forms() {
    let text = MLP.replace(
        "max_queue_delay_microseconds: 100",
        "preferred_batch_size: [ 8 ]",
    );
    let spec = spec_from_config(parse_text(&text).unwrap(), "mlp").unwrap();
    let batches: Vec<i64> = spec.warmup.iter().map(|w| w.inputs[0].shape[0]).collect();
    assert_eq!(batches, vec![1, 8, 32]);
    assert_eq!(spec.warmup[2].inputs[0].shape, vec![32, 64]);
    assert!(spec.warmup.iter().all(|w| w.count == 2));
}

#[test]
fn configured_warm_up_and_scaling_parameters() {
    let text = r#"
        platform: "pytorch_libtorch" max_batch_size: 4
        input [ { name: "x" data_type: TYPE_FP16 dims: [-1] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]
        instance_group [ { count: 3 } ]
        model_warmup [ { name: "w" batch_size: 2 count: 5
                         inputs { key: "x" value: { data_type: TYPE_FP16 dims: [3] random_data: true } } } ]
        parameters { key: "min_instances" value: { string_value: "0" } }
        parameters { key: "idle_timeout_secs" value: { string_value: "1.5" } }"#;
    let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
    assert_eq!(spec.warmup.len(), 1);
    assert_eq!(
        (spec.warmup[0].inputs[0].shape.clone(), spec.warmup[0].count),
        (vec![2, 3], 5)
    );
    assert_eq!(spec.warmup[0].inputs[0].data.len(), 12);
    assert_eq!(spec.scaling.min_instances, Some(0));
    assert_eq!(spec.scaling.idle_timeout, Some(Duration::from_millis(1500)));

    let bad = |from: &str, to: &str| {
        spec_from_config(parse_text(&text.replace(from, to)).unwrap(), "m").unwrap_err()
    };
    assert!(bad("TYPE_FP16 dims: [3]", "TYPE_FP32 dims: [3]").contains("the model takes FP16"));
    assert!(bad("key: \"x\" value", "key: \"z\" value").contains("no data for input 'x'"));
    assert!(bad("batch_size: 2", "batch_size: 9").contains("batch_size 9"));
    assert!(bad("string_value: \"0\"", "string_value: \"4\"").contains("min_instances"));
    assert!(bad("1.5", "-1").contains("idle_timeout_secs"));
    assert!(bad("1.5", "1e300").contains("idle_timeout_secs"));
    assert!(bad("1.5", "NaN").contains("idle_timeout_secs"));
}

#[test]
fn dynamic_batching_settings() {
    let text = r#"
        platform: "pytorch_libtorch" max_batch_size: 16
        input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]
        dynamic_batching {
          preferred_batch_size: [ 8, 4 ]
          max_queue_delay_microseconds: 500
          default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 2000
                                 allow_timeout_override: true timeout_action: DELAY }
        }"#;
    let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
    assert_eq!(spec.batching.preferred, vec![4, 8]);
    assert_eq!(spec.batching.max_batch_size, 16);
    assert_eq!(spec.queue.max_queue_size, 7);
    assert_eq!(spec.queue.default_timeout, Some(Duration::from_millis(2)));
    assert!(spec.queue.allow_timeout_override);
    assert!(!spec.queue.reject_on_timeout);

    let none = r#"platform: "pytorch_libtorch" max_batch_size: 16
        input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
    assert!(
        !spec_from_config(parse_text(none).unwrap(), "m")
            .unwrap()
            .batching
            .combine
    );
    let too_big = text.replace("[ 8, 4 ]", "[ 32 ]");
    assert!(spec_from_config(parse_text(&too_big).unwrap(), "m")
        .unwrap_err()
        .contains("32"));
}

#[test]
fn index_suffix_gives_the_position() {
    let text = r#"
        platform: "pytorch_libtorch"
        input [ { name: "b__1" data_type: TYPE_FP32 dims: [1] },
                { name: "a__0" data_type: TYPE_FP32 dims: [1] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
    let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
    assert_eq!(spec.name, "m");
    assert_eq!(spec.inputs[0].position, 1);
    assert_eq!(spec.inputs[1].position, 0);
    assert_eq!(spec.outputs[0].position, 0);
}

#[test]
fn rejections_say_why() {
    let bad = |text: &str, dir: &str| spec_from_config(parse_text(text).unwrap(), dir).unwrap_err();
    let io = r#"input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
    assert!(bad(&format!("platform: \"onnxruntime_onnx\" {io}"), "m").contains("onnxruntime_onnx"));
    assert!(bad(
        &format!("name: \"other\" platform: \"pytorch_libtorch\" {io}"),
        "m"
    )
    .contains("does not match"));
    let strings = r#"platform: "pytorch_libtorch" input [ { name: "x" data_type: TYPE_STRING dims: [1] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
    assert!(bad(strings, "m").contains("TYPE_STRING"));
    let no_input =
        r#"platform: "pytorch_libtorch" output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
    assert!(bad(no_input, "m").contains("no input"));
}

#[test]
fn lists_without_colon_parse_like_lists_with_one() {
    let plain = r#"input [ { name: "x[0]" data_type: TYPE_FP32 dims: [ 2 ] } ] # a [ comment
        output: [ { name: "y" data_type: TYPE_FP32 dims [ 2 ] } ]"#;
    let c = parse_text(plain).unwrap();
    assert_eq!(c.input[0].name, "x[0]");
    assert_eq!(c.input[0].dims, vec![2]);
    assert_eq!(c.output[0].dims, vec![2]);
    assert_eq!(colon_before_lists("a: \"q [\" b [1]"), "a: \"q [\" b :[1]");
}

/// A config of `max_batch_size` and dims `[2]` plus `extra`, validated under `limits`.
fn bounded(max_batch_size: u64, extra: &str, limits: &ModelLimits) -> Result<ModelSpec, String> {
    let text = format!(
        r#"platform: "pytorch_libtorch" max_batch_size: {max_batch_size}
           input [ {{ name: "x" data_type: TYPE_FP32 dims: [2] }} ]
           output [ {{ name: "y" data_type: TYPE_FP32 dims: [2] }} ] {extra}"#
    );
    spec_from_config_with(parse_text(&text).unwrap(), "m", limits)
}

#[test]
// Kept whole: a table of oversized config values and the rejection each gets.
fn sizes_from_a_config_are_bounded() {
    let limits = ModelLimits::default();
    let bad =
        |max_batch_size: u64, extra: &str| bounded(max_batch_size, extra, &limits).unwrap_err();
    assert!(bad(u64::from(MAX_BATCH_SIZE) + 1, "").contains("max_batch_size 65537 is above"));
    assert!(bounded(u64::from(MAX_BATCH_SIZE), "", &limits).is_ok());

    let many: String = (1..=MAX_PREFERRED_BATCH_SIZES + 1)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(bad(
        64,
        &format!("dynamic_batching {{ preferred_batch_size: [ {many} ] }}")
    )
    .contains("preferred_batch_size lists 33 sizes"));
    assert!(bad(
        4,
        "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }"
    )
    .contains("max_queue_delay_microseconds"));
    assert!(bad(
        4,
        "dynamic_batching { default_queue_policy { default_timeout_microseconds: 86400000001 } }"
    )
    .contains("default_timeout_microseconds"));
    assert!(bad(
        4,
        "dynamic_batching { default_queue_policy { max_queue_size: 1048577 } }"
    )
    .contains("max_queue_size 1048577"));
    let q = bounded(
        4,
        "dynamic_batching { default_queue_policy { max_queue_size: 1048576 } }",
        &limits,
    )
    .unwrap();
    assert_eq!(q.queue.max_queue_size, 1 << 20);

    let rank = vec!["1"; MAX_TENSOR_RANK + 1].join(", ");
    let deep = format!(
        r#"platform: "pytorch_libtorch" input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {rank} ] }} ]
           output [ {{ name: "y" data_type: TYPE_FP32 dims: [2] }} ]"#
    );
    assert!(spec_from_config(parse_text(&deep).unwrap(), "m")
        .unwrap_err()
        .contains("33 dims"));
    // Declared dims whose full batch cannot be counted in bytes.
    let wide = r#"platform: "pytorch_libtorch" max_batch_size: 65536
           input [ { name: "x" data_type: TYPE_FP64 dims: [ 4611686018427387904 ] } ]
           output [ { name: "y" data_type: TYPE_FP32 dims: [2] } ]"#;
    assert!(spec_from_config(parse_text(wide).unwrap(), "m")
        .unwrap_err()
        .contains("more bytes than can be addressed"));

    let outputs: String = (0..=MAX_MODEL_TENSORS)
        .map(|i| format!(r#"output {{ name: "y{i}" data_type: TYPE_FP32 dims: [1] }} "#))
        .collect();
    let text = format!(
        r#"platform: "pytorch_libtorch" input [ {{ name: "x" data_type: TYPE_FP32 dims: [1] }} ] {outputs}"#
    );
    assert!(spec_from_config(parse_text(&text).unwrap(), "m")
        .unwrap_err()
        .contains("257 outputs"));

    let params: String = (0..=MAX_PARAMETERS)
        .map(|i| format!(r#"parameters {{ key: "k{i}" value: {{ string_value: "v" }} }} "#))
        .collect();
    assert!(bad(4, &params).contains("257 parameters"));
    let long = format!(
        r#"parameters {{ key: "k" value: {{ string_value: "{}" }} }}"#,
        "v".repeat(MAX_PARAMETER_BYTES)
    );
    assert!(bad(4, &long).contains("parameter 'k' is longer"));
}

#[test]
// Kept whole: a table of configs at and past each limit.
fn instances_versions_and_warm_up_stay_within_the_limits() {
    let limits = ModelLimits {
        max_model_instances: 4,
        max_warmup_bytes: 1024,
    };
    let groups = "instance_group [ { count: 2 }, { count: 2 } ]";
    assert_eq!(bounded(4, groups, &limits).unwrap().instance_count, 4);
    let err = bounded(4, "instance_group [ { count: 2 }, { count: 3 } ]", &limits).unwrap_err();
    assert!(
        err.contains("max_model_instances 4") && err.contains("instance_group[1]"),
        "{err}"
    );
    let err = bounded(
        4,
        "instance_group [ { count: 2147483647 }, { count: 2147483647 } ]",
        &limits,
    )
    .unwrap_err();
    assert!(err.contains("instance_group[0]"), "{err}");
    let err = bounded(
        4,
        "version_policy { specific { versions: [1, 2, 3, 4, 5] } }",
        &limits,
    )
    .unwrap_err();
    assert!(err.contains("5 versions"), "{err}");

    // Default warm-up: batch 1 (8 bytes), 64 (512) and 128 (1024) would be 1544 bytes;
    // the sizes that fit are kept, smallest first.
    let spec = bounded(
        128,
        "dynamic_batching { preferred_batch_size: [ 64 ] }",
        &limits,
    )
    .unwrap();
    let sizes: Vec<i64> = spec.warmup.iter().map(|w| w.inputs[0].shape[0]).collect();
    assert_eq!(sizes, vec![1, 64]);
    let tiny = ModelLimits {
        max_warmup_bytes: 7,
        ..limits
    };
    assert!(bounded(4, "", &tiny)
        .unwrap_err()
        .contains("default warm-up at batch size 1 needs 8 bytes"));

    // Configured warm-up: the samples together, and each count.
    let sample = |name: &str, batch: u32, count: u32| {
        format!(
            r#"model_warmup {{ name: "{name}" batch_size: {batch} count: {count}
               inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [2] random_data: true }} }} }}"#
        )
    };
    let two = format!("{} {}", sample("a", 64, 1), sample("b", 64, 1));
    assert_eq!(bounded(64, &two, &limits).unwrap().warmup.len(), 2);
    let three = format!("{two} {}", sample("c", 1, 1));
    let err = bounded(64, &three, &limits).unwrap_err();
    assert!(
        err.contains("model_warmup 'c'") && err.contains("max_warmup_bytes 1024"),
        "{err}"
    );
    assert!(bounded(4, &sample("n", 1, MAX_WARMUP_COUNT + 1), &limits)
        .unwrap_err()
        .contains("count 1001 is above"));
    let samples: String = (0..=MAX_WARMUP_SAMPLES)
        .map(|i| sample(&format!("s{i}"), 1, 1))
        .collect();
    assert!(bounded(4, &samples, &limits)
        .unwrap_err()
        .contains("65 samples"));
}

#[test]
fn warm_up_files_stay_in_the_warmup_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir_all(model.join("warmup/sub")).unwrap();
    std::fs::write(model.join("warmup/sub/ok.bin"), [0u8; 8]).unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 8]).unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.bin"), model.join("warmup/out.bin"))
        .unwrap();
    let read = |file: &str| warmup_file(&model, file, 8, &[2], DataType::Fp32);
    assert_eq!(read("sub/ok.bin").unwrap(), vec![0u8; 8]);
    assert_eq!(read("./sub/ok.bin").unwrap(), vec![0u8; 8]);
    for refused in [
        "",
        "../secret.bin",
        "sub/../../secret.bin",
        "/etc/passwd",
        "sub\\ok.bin",
    ] {
        let err = read(refused).unwrap_err();
        assert!(err.contains("relative path"), "{refused}: {err}");
    }
    let err = read("out.bin").unwrap_err();
    assert!(
        err.contains("warmup/out.bin resolves to a file outside"),
        "{err}"
    );
    assert!(!err.contains(&dir.path().display().to_string()), "{err}");
    let err = warmup_file(&model, "sub/ok.bin", 4, &[1], DataType::Fp32).unwrap_err();
    assert!(err.contains("above the limit of 4"), "{err}");
    let err = warmup_file(&model, "sub/ok.bin", 12, &[3], DataType::Fp32).unwrap_err();
    assert!(
        err.contains("holds 8 bytes") && err.contains("needs 12"),
        "{err}"
    );
    let err = read("missing.bin").unwrap_err();
    assert!(err.contains("cannot read warmup/missing.bin"), "{err}");
    assert!(!err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn json_configs_parse_like_text_ones() {
    let json = r#"{"name": "mlp", "platform": "pytorch_libtorch", "maxBatchSize": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["64"]}],
        "output": [{"name": "y", "dataType": "TYPE_FP32", "dims": [10]}]}"#;
    let c = parse_json(json).unwrap();
    assert_eq!((c.max_batch_size, c.input[0].dims.clone()), (8, vec![64]));
    assert!(parse_json("{").is_err());
    assert!(parse_json(r#"{"name": "m"} trailing"#).is_err());
    assert!(parse_json(r#"{"nope": 1}"#).unwrap_err().contains("nope"));
    let huge = format!(r#"{{"name": "{}"}}"#, "m".repeat(1 << 20));
    assert!(parse_json(&huge).unwrap_err().contains("bytes long"));
}

#[test]
fn syntax_errors_are_reported() {
    let err = parse_text("max_batch_size: 8\ninput [ { name: \"x\" ").unwrap_err();
    assert!(!err.is_empty());
    assert!(parse_text("no_such_field: 1")
        .unwrap_err()
        .contains("no_such_field"));
}
