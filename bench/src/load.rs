//! The workers that send load: closed loop (N clients, each sends its next request
//! when the previous one is answered) and open loop (requests sent at scheduled
//! times, whether or not earlier ones were answered).
//!
//! Each worker owns its [`PointStats`]; [`run_point`] merges them. In open loop every
//! request is its own task, so a slow answer never delays the next send; the
//! dispatcher only waits for its next intended time or, when `max_in_flight`
//! requests are outstanding, for a free slot. Either way a late send is measured
//! (lag) and its latency still counts from the intended time.
//!
//! The dispatcher runs on the same runtime as its requests: a dispatcher on a thread
//! of its own, spawning onto the runtime, was measured to fall behind more, not less
//! (cross-thread spawns and wake-ups). tokio's timer ticks once a millisecond and
//! rounds every wake-up up to the next tick, so waiting for the intended time itself
//! would send each request up to a tick late, and that delay, the generator's own,
//! would count in its latency. The dispatcher instead wakes up to [`SEND_AHEAD`] before
//! the intended time and sends then; an early request's latency counts from when it
//! was actually sent (see [`Outcome::latency`]). A kernel timer per request (timerfd)
//! sends on time but was measured to cost the generator 0.05 cores more at 4,300
//! requests/s, taken from the server it shares the machine with. What lag remains (the
//! generator busy) is part of the measured latency and is reported (p50, p99, max).
//!
//! Every request task ends by the point's hard end (run length + drain period), so
//! a point is bounded in time whatever the server does.
//!
//! With a priority mix every request is numbered (open loop: its place in the
//! schedule, so the levels do not depend on timing; closed loop: a counter shared by
//! the clients) and sent as the copy of the request for its number's level.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::inference::ModelInferRequest;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tonic::Code;

use crate::priority::{with_priority, PriorityMix};
use crate::progress::Live;
use crate::schedule::{Arrival, Profile, Schedule};
use crate::stats::{Outcome, PointStats, StatsConfig};
use crate::target::Target;
use crate::wire::{Encoded, InferConnection};

/// How long before its intended time an open-loop request may leave: one tick of
/// tokio's timer, so that rounding a wake-up up to the next tick never makes it late.
pub const SEND_AHEAD: Duration = Duration::from_millis(1);

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
    /// Priority levels to give the requests (None: requests carry no priority).
    pub priorities: Option<PriorityMix>,
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

    fn new_stats(&self) -> PointStats {
        let levels = self.priorities.iter().flat_map(PriorityMix::levels);
        PointStats::new(self.stats_config(), levels)
    }
}

/// The requests of a point, encoded once: one per priority level of the mix, or the
/// one request.
struct Requests {
    mix: Option<PriorityMix>,
    /// Without a mix, just the request; with one, its copy for each level in order.
    variants: Vec<Encoded>,
}

/// A request to send: its priority slot (an index into the mix's levels), if any.
struct Picked {
    slot: Option<usize>,
    request: Encoded,
}

impl Requests {
    fn new(request: &ModelInferRequest, mix: Option<&PriorityMix>) -> Requests {
        let variants = match mix {
            None => vec![Encoded::new(request)],
            Some(mix) => mix
                .levels()
                .map(|level| Encoded::new(&with_priority(request, level)))
                .collect(),
        };
        Requests {
            mix: mix.cloned(),
            variants,
        }
    }

    /// The slot of the n-th request of the point (from 0).
    fn slot(&self, n: u64) -> Option<usize> {
        self.mix.as_ref().map(|mix| mix.slot(n))
    }

    /// The n-th request of the point (from 0).
    fn pick(&self, n: u64) -> Picked {
        let slot = self.slot(n);
        Picked {
            slot,
            request: self.variants[slot.unwrap_or(0)].clone(),
        }
    }
}

/// Runs one point and returns what all its workers measured.
pub async fn run_point(
    target: &Target,
    request: Arc<ModelInferRequest>,
    config: &PointConfig,
    live: &Arc<Live>,
) -> PointStats {
    let requests = Arc::new(Requests::new(&request, config.priorities.as_ref()));
    let start = Instant::now();
    let hard_end = start + config.load.length() + config.drain;
    let worker = |i: usize| Worker {
        connection: target.infer(i),
        requests: Arc::clone(&requests),
        start,
        hard_end,
        deadline: config.deadline,
        stats: config.new_stats(),
        live: Arc::clone(live),
    };
    let mut workers = JoinSet::new();
    match &config.load {
        Load::Closed {
            concurrency,
            length,
        } => {
            let numbers = Arc::new(AtomicU64::new(0));
            for i in 0..(*concurrency).max(1) {
                workers.spawn(worker(i).closed_loop(start + *length, Arc::clone(&numbers)));
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
                // exactly the schedule, whatever the arrival process. Each time keeps its
                // place in the schedule, the request's number.
                let share = Schedule::new(profile, *arrival, config.seed)
                    .zip(0_u64..)
                    .skip(k)
                    .step_by(n);
                workers.spawn(worker(k).open_loop(share, open));
            }
        }
    }
    let mut total = config.new_stats();
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
    connection: InferConnection,
    requests: Arc<Requests>,
    start: Instant,
    hard_end: Instant,
    deadline: Option<Duration>,
    stats: PointStats,
    live: Arc<Live>,
}

impl Worker {
    /// Sends until `end`, numbering requests from `numbers`, shared by the clients.
    async fn closed_loop(mut self, end: Instant, numbers: Arc<AtomicU64>) -> PointStats {
        while Instant::now() < end {
            let picked = self.requests.pick(numbers.fetch_add(1, Ordering::Relaxed));
            let sent = self.start.elapsed();
            let reply = send(
                self.connection.clone(),
                picked.request,
                self.request_times(sent),
            )
            .await;
            let unanswered = matches!(reply, Reply::Unanswered { .. });
            self.record(picked.slot, reply);
            if unanswered {
                break;
            }
        }
        self.stats
    }

    /// Sends at the intended times of `schedule`, each with its request number.
    async fn open_loop(
        mut self,
        mut schedule: impl Iterator<Item = (Duration, u64)>,
        limits: OpenLimits,
    ) -> PointStats {
        let mut in_flight = JoinSet::new();
        for (intended, number) in schedule.by_ref() {
            let at = (self.start + intended)
                .checked_sub(SEND_AHEAD)
                .unwrap_or(self.start);
            // Wait for the send time and a free slot, recording answers meanwhile.
            loop {
                tokio::select! {
                    biased;
                    Some(reply) = in_flight.join_next(), if !in_flight.is_empty() => {
                        let (slot, reply) = reply.expect("request tasks do not panic");
                        self.record(slot, reply);
                    }
                    () = sleep_until(at), if in_flight.len() < limits.max_in_flight => break,
                }
            }
            let Picked { slot, request } = self.requests.pick(number);
            if self.start.elapsed() > limits.stop_sending {
                self.stats.record_unsent(slot, intended);
                break;
            }
            let reply = send(
                self.connection.clone(),
                request,
                self.request_times(intended),
            );
            in_flight.spawn(async move { (slot, reply.await) });
        }
        for (intended, number) in schedule {
            self.stats
                .record_unsent(self.requests.slot(number), intended);
        }
        while let Some(reply) = in_flight.join_next().await {
            let (slot, reply) = reply.expect("request tasks do not panic");
            self.record(slot, reply);
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

    /// Records the reply of a request with priority slot `slot`.
    fn record(&mut self, slot: Option<usize>, reply: Reply) {
        match reply {
            Reply::Answered(outcome) => {
                self.stats.record(slot, &outcome);
                self.live.observe(&outcome);
            }
            Reply::Unanswered { intended, sent } => {
                self.stats
                    .record_unfinished(slot, intended, sent.saturating_sub(intended));
            }
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
async fn send(connection: InferConnection, request: Encoded, times: RequestTimes) -> Reply {
    let sent = times.start.elapsed();
    match timeout_at(times.hard_end, call(&connection, &request, times.deadline)).await {
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
/// deadline as gRPC clients do (resetting the stream); a deadline that expires at the
/// client counts as DEADLINE_EXCEEDED, and so does CANCELLED once the deadline has
/// passed (servers built on tonic answer an expired `grpc-timeout` that way).
async fn call(connection: &InferConnection, request: &Encoded, deadline: Option<Duration>) -> Code {
    let Some(deadline) = deadline else {
        return connection.infer(request, None).await;
    };
    let begun = Instant::now();
    match timeout(deadline, connection.infer(request, Some(deadline))).await {
        Ok(Code::Cancelled) if begun.elapsed() >= deadline => Code::DeadlineExceeded,
        Ok(code) => code,
        Err(_) => Code::DeadlineExceeded,
    }
}
