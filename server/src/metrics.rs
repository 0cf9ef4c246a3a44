//! Every metric sluice exports: names (base units in the name), help text, buckets.
//! Labels come from closed sets only: model names from the repository, outcomes from
//! `Error::kind()`, drop reasons from [`DropReason`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "sluice_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "sluice_request_duration_seconds";
pub const COMPUTE_DURATION_SECONDS: &str = "sluice_compute_duration_seconds";
pub const DROPPED_REQUESTS_TOTAL: &str = "sluice_dropped_requests_total";
pub const REJECTED_REQUESTS_TOTAL: &str = "sluice_rejected_requests_total";
pub const QUEUE_DURATION_SECONDS: &str = "sluice_queue_duration_seconds";
pub const QUEUE_DEPTH: &str = "sluice_queue_depth";
pub const BATCH_SIZE: &str = "sluice_batch_size";
pub const EXECUTIONS_TOTAL: &str = "sluice_executions_total";
pub const INFERENCES_TOTAL: &str = "sluice_inferences_total";
pub const INSTANCES: &str = "sluice_instances";
pub const INSTANCE_LOADS_TOTAL: &str = "sluice_instance_loads_total";
pub const INSTANCE_UNLOADS_TOTAL: &str = "sluice_instance_unloads_total";
pub const COLD_STARTS_TOTAL: &str = "sluice_cold_starts_total";
pub const LOAD_DURATION_SECONDS: &str = "sluice_instance_load_duration_seconds";
pub const WARMUP_DURATION_SECONDS: &str = "sluice_instance_warmup_duration_seconds";
pub const COLD_START_WAIT_SECONDS: &str = "sluice_cold_start_wait_seconds";
pub const STUCK_INSTANCES: &str = "sluice_stuck_instances";
pub const STUCK_INSTANCE_DETECTIONS_TOTAL: &str = "sluice_stuck_instance_detections_total";

/// Label value for requests naming a model the repository does not have, so unknown
/// names cannot grow the label set.
pub const ADMITTED_REQUESTS_TOTAL: &str = "sluice_admitted_requests_total";
pub const CONCURRENCY_LIMIT: &str = "sluice_concurrency_limit";
pub const IN_FLIGHT_REQUESTS: &str = "sluice_in_flight_requests";
pub const RETRIES_TOTAL: &str = "sluice_retries_total";

pub const REFUSAL_DURATION_SECONDS: &str = "sluice_refusal_duration_seconds";
pub const TRANSPORT_REFUSALS_TOTAL: &str = "sluice_transport_refusals_total";
pub const OPEN_CONNECTIONS: &str = "sluice_open_connections";
pub const REQUEST_BYTES_IN_FLIGHT: &str = "sluice_request_bytes_in_flight";

pub const UNKNOWN_MODEL: &str = "_unknown";
/// The `model` label of server-wide events (the global in-flight limit).
pub const ALL_MODELS: &str = "_all";

/// Latency buckets from 50 µs to 10 s: the gateway's own overhead sits at the bottom,
/// cold starts and deadline-bound waits at the top.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Batch sizes (samples per execution): powers of two up to the largest usual max_batch_size.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

pub use crate::error::RejectReason;

/// Label values of priority levels 1..=MAX_PRIORITY_LEVELS (index 0: unknown), static
/// so that counting a request allocates no label.
const PRIORITY_LABELS: [&str; 17] = [
    "", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

const _: () = assert!(PRIORITY_LABELS.len() == crate::spec::MAX_PRIORITY_LEVELS as usize + 1);

/// Label value of a priority level ("" when unknown, e.g. before the model is resolved).
fn priority_label(level: Option<u32>) -> &'static str {
    level
        .and_then(|l| PRIORITY_LABELS.get(l as usize))
        .copied()
        .unwrap_or_default()
}

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

/// Why the transport refused a connection or a request body before any handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportRefusal {
    /// The port's connection cap was reached: the connection was closed on accept.
    ConnectionLimit,
    /// The server-wide budget of request bytes in flight was full.
    BytesInFlight,
    /// A message announced more bytes than the largest message allowed.
    MessageTooLarge,
    /// A message did not arrive in full within the body-read timeout.
    BodyTimeout,
    /// The call's deadline passed while its request body was still arriving.
    BodyDeadline,
}

impl TransportRefusal {
    fn label(self) -> &'static str {
        match self {
            TransportRefusal::ConnectionLimit => "connection_limit",
            TransportRefusal::BytesInFlight => "bytes_in_flight",
            TransportRefusal::MessageTooLarge => "message_too_large",
            TransportRefusal::BodyTimeout => "body_timeout",
            TransportRefusal::BodyDeadline => "body_deadline",
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
                .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
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

// Kept whole: one registration per metric, the list a reader scans for a name.
fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Inference requests answered, by model and outcome."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving an inference request to answering it, by model."
    );
    describe_histogram!(
        REFUSAL_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a ModelInfer call's HEADERS frame to its overload refusal (UNAVAILABLE), by stage: edge (judged from the body's first bytes) or admission."
    );
    describe_histogram!(
        COMPUTE_DURATION_SECONDS,
        Unit::Seconds,
        "Time the model's forward took per execution, by model."
    );
    describe_histogram!(
        QUEUE_DURATION_SECONDS,
        Unit::Seconds,
        "Time requests waited in the model's queue before dispatch, by model."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting in the model's queue, by model."
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Samples per model execution, by model."
    );
    describe_counter!(
        EXECUTIONS_TOTAL,
        Unit::Count,
        "Model executions (batches), by model."
    );
    describe_counter!(
        INFERENCES_TOTAL,
        Unit::Count,
        "Samples inferred, by model; over executions it is the mean batch size."
    );
    describe_gauge!(
        INSTANCES,
        Unit::Count,
        "Model instances loaded or loading, by model."
    );
    describe_counter!(
        INSTANCE_LOADS_TOTAL,
        Unit::Count,
        "Instances loaded and warmed up, by model."
    );
    describe_counter!(
        INSTANCE_UNLOADS_TOTAL,
        Unit::Count,
        "Instances unloaded after their idle timeout, by model."
    );
    describe_counter!(
        COLD_STARTS_TOTAL,
        Unit::Count,
        "Loads started because requests arrived at zero instances, by model."
    );
    describe_histogram!(
        LOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Time to load one instance's weights, by model."
    );
    describe_histogram!(
        WARMUP_DURATION_SECONDS,
        Unit::Seconds,
        "Time one instance spent on its warm-up, by model."
    );
    describe_histogram!(
        COLD_START_WAIT_SECONDS,
        Unit::Seconds,
        "Time requests waited for a cold start (zero instances to the first ready), by model."
    );
    describe_gauge!(
        STUCK_INSTANCES,
        Unit::Count,
        "Instances out of service because one execution ran past max_execution_secs and has not returned, by model."
    );
    describe_counter!(
        STUCK_INSTANCE_DETECTIONS_TOTAL,
        Unit::Count,
        "Instances found stuck (an execution running past max_execution_secs), by model."
    );
    describe_counter!(
        REJECTED_REQUESTS_TOTAL,
        Unit::Count,
        "Requests refused at once at admission, by model, reason and priority level."
    );
    describe_counter!(
        ADMITTED_REQUESTS_TOTAL,
        Unit::Count,
        "Requests admitted past the concurrency limits, by model and priority level."
    );
    describe_gauge!(
        CONCURRENCY_LIMIT,
        Unit::Count,
        "The model's current concurrency limit (requests in flight it admits), by model."
    );
    describe_gauge!(
        IN_FLIGHT_REQUESTS,
        Unit::Count,
        "Inference requests admitted and not yet answered, in the whole server."
    );
    describe_counter!(
        RETRIES_TOTAL,
        Unit::Count,
        "Transient failures retried inside the gateway (outcome retried) or answered because the retry budget was spent (budget_exhausted), by model."
    );
    describe_counter!(
        TRANSPORT_REFUSALS_TOTAL,
        Unit::Count,
        "Connections and request bodies refused by the transport before any handler ran, by port and reason."
    );
    describe_gauge!(
        OPEN_CONNECTIONS,
        Unit::Count,
        "Connections open, by port (grpc, http, metrics)."
    );
    describe_gauge!(
        REQUEST_BYTES_IN_FLIGHT,
        Unit::Bytes,
        "Request bytes reserved from the max_request_bytes_in_flight budget (received, being decoded or awaiting their answer)."
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

/// One ModelInfer call refused for overload (UNAVAILABLE), from its HEADERS frame to
/// its answer; `stage`: `edge` (from the body's first bytes) or `admission`.
pub fn refusal_duration(stage: &'static str, elapsed: Duration) {
    histogram!(REFUSAL_DURATION_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// One execution of the model on a batch of `samples`.
pub fn execution(model: &str, samples: usize, compute: Duration) {
    histogram!(COMPUTE_DURATION_SECONDS, "model" => model.to_owned()).record(compute.as_secs_f64());
    histogram!(BATCH_SIZE, "model" => model.to_owned()).record(samples as f64);
    counter!(EXECUTIONS_TOTAL, "model" => model.to_owned()).increment(1);
    counter!(INFERENCES_TOTAL, "model" => model.to_owned()).increment(samples as u64);
}

pub fn queue_wait(model: &str, waited: Duration) {
    histogram!(QUEUE_DURATION_SECONDS, "model" => model.to_owned()).record(waited.as_secs_f64());
}

pub fn queue_depth(model: &str, depth: usize) {
    gauge!(QUEUE_DEPTH, "model" => model.to_owned()).set(depth as f64);
}

pub fn rejected(model: &str, reason: RejectReason, priority: Option<u32>) {
    counter!(REJECTED_REQUESTS_TOTAL, "model" => model.to_owned(), "reason" => reason.label(),
        "priority" => priority_label(priority))
    .increment(1);
}

pub fn admitted(model: &str, priority: u32) {
    counter!(ADMITTED_REQUESTS_TOTAL, "model" => model.to_owned(), "priority" => priority_label(Some(priority)))
        .increment(1);
}

pub fn concurrency_limit(model: &str, limit: usize) {
    gauge!(CONCURRENCY_LIMIT, "model" => model.to_owned()).set(limit as f64);
}

pub fn in_flight(n: usize) {
    gauge!(IN_FLIGHT_REQUESTS).set(n as f64);
}

pub fn retry(model: &str, outcome: &'static str) {
    counter!(RETRIES_TOTAL, "model" => model.to_owned(), "outcome" => outcome).increment(1);
}

pub fn dropped(model: &str, reason: DropReason) {
    counter!(DROPPED_REQUESTS_TOTAL, "model" => model.to_owned(), "reason" => reason.label())
        .increment(1);
}

pub fn instances(model: &str, live: usize) {
    gauge!(INSTANCES, "model" => model.to_owned()).set(live as f64);
}

pub fn instance_loaded(model: &str, load: Duration, warmup: Duration) {
    counter!(INSTANCE_LOADS_TOTAL, "model" => model.to_owned()).increment(1);
    histogram!(LOAD_DURATION_SECONDS, "model" => model.to_owned()).record(load.as_secs_f64());
    histogram!(WARMUP_DURATION_SECONDS, "model" => model.to_owned()).record(warmup.as_secs_f64());
}

pub fn instance_unloaded(model: &str) {
    counter!(INSTANCE_UNLOADS_TOTAL, "model" => model.to_owned()).increment(1);
}

pub fn cold_start(model: &str) {
    counter!(COLD_STARTS_TOTAL, "model" => model.to_owned()).increment(1);
}

pub fn cold_start_wait(model: &str, waited: Duration) {
    histogram!(COLD_START_WAIT_SECONDS, "model" => model.to_owned()).record(waited.as_secs_f64());
}

pub fn transport_refusal(port: &'static str, reason: TransportRefusal) {
    counter!(TRANSPORT_REFUSALS_TOTAL, "port" => port, "reason" => reason.label()).increment(1);
}

pub fn open_connections(port: &'static str, open: usize) {
    gauge!(OPEN_CONNECTIONS, "port" => port).set(open as f64);
}

pub fn request_bytes_in_flight(bytes: usize) {
    gauge!(REQUEST_BYTES_IN_FLIGHT).set(bytes as f64);
}

pub fn stuck_instances(model: &str, stuck: usize) {
    gauge!(STUCK_INSTANCES, "model" => model.to_owned()).set(stuck as f64);
}

pub fn stuck_detected(model: &str) {
    counter!(STUCK_INSTANCE_DETECTIONS_TOTAL, "model" => model.to_owned()).increment(1);
}
