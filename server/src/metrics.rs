//! Every metric sluice exports: names (base units in the name), help text, buckets.
//! Labels come from closed sets only: model names from the repository, outcomes from
//! `Error::kind()`, drop reasons from [`DropReason`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "sluice_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "sluice_request_duration_seconds";
pub const COMPUTE_DURATION_SECONDS: &str = "sluice_compute_duration_seconds";
pub const DROPPED_REQUESTS_TOTAL: &str = "sluice_dropped_requests_total";

/// Label value for requests naming a model the repository does not have, so unknown
/// names cannot grow the label set.
pub const UNKNOWN_MODEL: &str = "_unknown";

/// Latency buckets from 50 µs to 10 s: the gateway's own overhead sits at the bottom,
/// cold starts and deadline-bound waits at the top.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why accepted work was dropped before it reached the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The client went away (its reply channel closed).
    Cancelled,
    /// The request's deadline passed while it waited.
    Expired,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::Cancelled => "cancelled",
            DropReason::Expired => "expired",
        }
    }
}

/// Install the process-wide recorder once and return the handle that renders `/metrics`.
/// Servers started later in the same process (tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
                .expect("bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // A recorder set by an embedding program wins; we still render ours.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(REQUESTS_TOTAL, Unit::Count, "Inference requests answered, by model and outcome.");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving an inference request to answering it, by model."
    );
    describe_histogram!(
        COMPUTE_DURATION_SECONDS,
        Unit::Seconds,
        "Time the model's forward took per execution, by model."
    );
    describe_counter!(
        DROPPED_REQUESTS_TOTAL,
        Unit::Count,
        "Accepted requests dropped before reaching the model, by model and reason."
    );
}

/// One answered inference request.
pub fn request(model: &str, outcome: &'static str, elapsed: Duration) {
    counter!(REQUESTS_TOTAL, "model" => model.to_owned(), "outcome" => outcome).increment(1);
    histogram!(REQUEST_DURATION_SECONDS, "model" => model.to_owned()).record(elapsed.as_secs_f64());
}

/// One execution of the model.
pub fn compute(model: &str, elapsed: Duration) {
    histogram!(COMPUTE_DURATION_SECONDS, "model" => model.to_owned()).record(elapsed.as_secs_f64());
}

pub fn dropped(model: &str, reason: DropReason) {
    counter!(DROPPED_REQUESTS_TOTAL, "model" => model.to_owned(), "reason" => reason.label()).increment(1);
}
