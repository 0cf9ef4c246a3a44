//! The workers that send load: closed loop (N clients, each sends its next request
//! when the previous one is answered) and open loop (requests sent at scheduled
//! times, whether or not earlier ones were answered).
//!
//! Each worker owns its [`Stats`]; [`run_point`] merges them. In open loop every
//! request is its own task, so a slow answer never delays the next send; the
//! dispatcher only waits for its next intended time or, when `max_in_flight`
//! requests are outstanding, for a free slot. Either way a late send is measured
//! (lag) and its latency still counts from the intended time.
//!
//! The dispatcher runs on the same runtime as its requests: a dispatcher on a thread
//! of its own, spawning onto the runtime, was measured to fall behind more, not less
//! (cross-thread spawns and wake-ups). tokio's timer has 1 ms resolution, so sends
//! are normally up to 1-2 ms behind their intended time; that lag is part of the
//! measured latency and is reported (p50, p99 and max lag).
//!
//! Every request task ends by the point's hard end (run length + drain period), so
//! a point is bounded in time whatever the server does.

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::inference::ModelInferRequest;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tonic::Code;

use crate::progress::Live;
use crate::schedule::{Arrival, Profile, Schedule};
use crate::stats::{Outcome, Stats, StatsConfig};
use crate::target::{Client, Target};

/// The shape of the load at one point of a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Load {
    /// `concurrency` clients in a loop for `length`.
    Closed {
        concurrency: usize,
        length: Duration,
    },
    /// Requests at the times `arrival` draws from `profile`, for the profile's length.
    Open { profile: Profile, arrival: Arrival },
}

impl Load {
    /// How long requests are sent.
    pub fn length(&self) -> Duration {
        match self {
            Load::Closed { length, .. } => *length,
            Load::Open { profile, .. } => profile.duration(),
        }
    }
}

/// Everything one point of a run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PointConfig {
    pub load: Load,
    /// Requests intended before this are not in the summary (only in the series).
    pub warmup: Duration,
    /// Per-request deadline, sent as `grpc-timeout` and enforced by the client.
    pub deadline: Option<Duration>,
    /// Open loop: most requests outstanding at once, over all workers.
    pub max_in_flight: usize,
    /// Open loop: a send later than this behind schedule counts as late.
    pub late_threshold: Duration,
    /// After the last send, how long to wait for outstanding answers.
    pub drain: Duration,
    /// Open loop: dispatcher tasks, each with its own connection and share of the schedule.
    pub workers: usize,
    /// Seed of the Poisson schedule.
    pub seed: u64,
}

impl PointConfig {
    fn stats_config(&self) -> StatsConfig {
        StatsConfig {
            window_start: self.warmup,
            window_end: self.load.length(),
            deadline: self.deadline,
            late_threshold: self.late_threshold,
        }
    }
}

/// Runs one point and returns what all its workers measured.
pub async fn run_point(
    target: &Target,
    request: Arc<ModelInferRequest>,
    config: &PointConfig,
    live: &Arc<Live>,
) -> Stats {
    let start = Instant::now();
    let hard_end = start + config.load.length() + config.drain;
    let worker = |i: usize| Worker {
        client: target.client(i),
        request: Arc::clone(&request),
        start,
        hard_end,
        deadline: config.deadline,
        stats: Stats::new(config.stats_config()),
        live: Arc::clone(live),
    };
    let mut workers = JoinSet::new();
    match &config.load {
        Load::Closed {
            concurrency,
            length,
        } => {
            for i in 0..(*concurrency).max(1) {
                workers.spawn(worker(i).closed_loop(start + *length));
            }
        }
        Load::Open { profile, arrival } => {
            let n = config.workers.max(1);
            let open = OpenLimits {
                max_in_flight: (config.max_in_flight / n).max(1),
                // A request that could not be sent within the late threshold of the
                // schedule's end is given up rather than stretching the run.
                stop_sending: profile.duration() + config.late_threshold,
            };
            for k in 0..n {
                // Worker k takes every n-th time of the one schedule: together they send
                // exactly the schedule, whatever the arrival process.
                let share = Schedule::new(profile, *arrival, config.seed)
                    .skip(k)
                    .step_by(n);
                workers.spawn(worker(k).open_loop(share, open));
            }
        }
    }
    let mut total = Stats::new(config.stats_config());
    while let Some(stats) = workers.join_next().await {
        total.merge(&stats.expect("load workers do not panic"));
    }
    total
}

#[derive(Clone, Copy, Debug)]
struct OpenLimits {
    max_in_flight: usize,
    stop_sending: Duration,
}

/// What one request task ends with.
enum Reply {
    Answered(Outcome),
    /// No answer by the point's hard end.
    Unanswered {
        intended: Duration,
        sent: Duration,
    },
}

struct Worker {
    client: Client,
    request: Arc<ModelInferRequest>,
    start: Instant,
    hard_end: Instant,
    deadline: Option<Duration>,
    stats: Stats,
    live: Arc<Live>,
}

impl Worker {
    async fn closed_loop(mut self, end: Instant) -> Stats {
        while Instant::now() < end {
            let sent = self.start.elapsed();
            let reply = send(
                self.client.clone(),
                Arc::clone(&self.request),
                self.request_times(sent),
            )
            .await;
            let unanswered = matches!(reply, Reply::Unanswered { .. });
            self.record(reply);
            if unanswered {
                break;
            }
        }
        self.stats
    }

    async fn open_loop(
        mut self,
        mut schedule: impl Iterator<Item = Duration>,
        limits: OpenLimits,
    ) -> Stats {
        let mut in_flight = JoinSet::new();
        for intended in schedule.by_ref() {
            let at = self.start + intended;
            // Wait for the send time and a free slot, recording answers meanwhile.
            loop {
                tokio::select! {
                    biased;
                    Some(reply) = in_flight.join_next(), if !in_flight.is_empty() => {
                        self.record(reply.expect("request tasks do not panic"));
                    }
                    () = sleep_until(at), if in_flight.len() < limits.max_in_flight => break,
                }
            }
            if self.start.elapsed() > limits.stop_sending {
                self.stats.record_unsent(intended);
                break;
            }
            let times = self.request_times(intended);
            in_flight.spawn(send(self.client.clone(), Arc::clone(&self.request), times));
        }
        for intended in schedule {
            self.stats.record_unsent(intended);
        }
        while let Some(reply) = in_flight.join_next().await {
            self.record(reply.expect("request tasks do not panic"));
        }
        self.stats
    }

    fn request_times(&self, intended: Duration) -> RequestTimes {
        RequestTimes {
            start: self.start,
            intended,
            deadline: self.deadline,
            hard_end: self.hard_end,
        }
    }

    fn record(&mut self, reply: Reply) {
        match reply {
            Reply::Answered(outcome) => {
                self.stats.record(&outcome);
                self.live.observe(&outcome);
            }
            Reply::Unanswered { intended, sent } => self
                .stats
                .record_unfinished(intended, sent.saturating_sub(intended)),
        }
    }
}

/// The clock readings and limits of one request.
#[derive(Clone, Copy, Debug)]
struct RequestTimes {
    start: Instant,
    intended: Duration,
    deadline: Option<Duration>,
    hard_end: Instant,
}

/// Sends one request now and waits for its answer, at most until the hard end.
async fn send(mut client: Client, request: Arc<ModelInferRequest>, times: RequestTimes) -> Reply {
    let sent = times.start.elapsed();
    match timeout_at(times.hard_end, call(&mut client, &request, times.deadline)).await {
        Ok(code) => Reply::Answered(Outcome {
            intended: times.intended,
            sent,
            done: times.start.elapsed(),
            code,
        }),
        Err(_) => Reply::Unanswered {
            intended: times.intended,
            sent,
        },
    }
}

/// One ModelInfer call, reduced to its status code.
///
/// With a deadline the request carries `grpc-timeout`, and the client gives up at the
/// deadline as gRPC clients do; a deadline that expires at the client counts as
/// DEADLINE_EXCEEDED (tonic itself reports its own expired timer as CANCELLED).
async fn call(
    client: &mut Client,
    request: &ModelInferRequest,
    deadline: Option<Duration>,
) -> Code {
    let mut message = tonic::Request::new(request.clone());
    let Some(deadline) = deadline else {
        return code_of(client.model_infer(message).await);
    };
    message.set_timeout(deadline);
    let begun = Instant::now();
    match timeout(deadline, client.model_infer(message)).await {
        Ok(Err(status)) if status.code() == Code::Cancelled && begun.elapsed() >= deadline => {
            Code::DeadlineExceeded
        }
        Ok(result) => code_of(result),
        Err(_) => Code::DeadlineExceeded,
    }
}

fn code_of<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}
