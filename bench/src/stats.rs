//! What a run measured: latency histograms per outcome, counts per gRPC status,
//! schedule lag, and a per-second time series.
//!
//! Every worker records into its own [`PointStats`] (a [`Stats`] for the totals and
//! one per priority level) without locks; the run merges them at the end with
//! [`PointStats::merge`]. Latencies are recorded in microseconds in
//! auto-resizing HDR histograms (3 significant digits for the summary, 2 for the
//! per-second series, which only feeds plots).

use std::time::Duration;

use hdrhistogram::Histogram;
use tonic::Code;

/// The number of gRPC status codes (0 = OK ... 16 = UNAUTHENTICATED).
pub const CODES: usize = 17;

/// One finished request, with times as offsets from the start of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// When the request was meant to be sent (open loop: the schedule; closed loop:
    /// the moment it was sent).
    pub intended: Duration,
    /// When it was handed to the client.
    pub sent: Duration,
    /// When its answer (or error) arrived.
    pub done: Duration,
    pub code: Code,
}

impl Outcome {
    /// Latency as the user sees it: from the intended send time to the answer, or from
    /// the actual send if that was earlier (the generator may send a little ahead of
    /// schedule; a late send still counts from the intended time).
    pub fn latency(&self) -> Duration {
        self.done.saturating_sub(self.intended.min(self.sent))
    }

    /// How late the generator sent the request.
    pub fn lag(&self) -> Duration {
        self.sent.saturating_sub(self.intended)
    }
}

/// What the recorder needs to know to classify outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsConfig {
    /// Outcomes whose intended time falls in `[window_start, window_end)` count in
    /// the summary; the time series counts everything.
    pub window_start: Duration,
    pub window_end: Duration,
    /// A success slower than this is not goodput (None: every success is).
    pub deadline: Option<Duration>,
    /// A send later than this behind its intended time counts as late.
    pub late_threshold: Duration,
}

/// One second of the time series, by intended send time.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub sent: u64,
    pub ok: u64,
    pub rejected: u64,
    /// Latency of the successes in this second, in microseconds.
    pub ok_latency: Histogram<u64>,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            sent: 0,
            ok: 0,
            rejected: 0,
            ok_latency: histogram(2),
        }
    }

    fn merge(&mut self, other: &Bucket) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.ok_latency
            .add(&other.ok_latency)
            .expect("auto-resizing histograms always merge");
    }
}

/// Everything one worker (or, after merging, the whole run) measured.
#[derive(Clone, Debug)]
pub struct Stats {
    config: StatsConfig,
    /// Latency of successes, microseconds.
    pub ok: Histogram<u64>,
    /// Latency of every non-OK answer (rejections, deadlines, errors), microseconds.
    pub rejected: Histogram<u64>,
    /// Latency of the refusals among them (UNAVAILABLE, RESOURCE_EXHAUSTED: the server
    /// turned the request away), microseconds.
    pub refused: Histogram<u64>,
    /// Answers per gRPC status code, indexed by the code's number.
    pub codes: [u64; CODES],
    /// Successes within the deadline.
    pub good: u64,
    /// Requests sent in the window.
    pub sent: u64,
    /// Requests scheduled in the window that the generator never sent (it fell behind).
    pub unsent: u64,
    /// Requests sent that had no answer when the run's drain period ended.
    pub unfinished: u64,
    /// How late requests were sent, microseconds.
    pub lag: Histogram<u64>,
    /// Requests sent more than `late_threshold` behind schedule.
    pub late: u64,
    /// Per-second series over the whole run, warm-up included.
    pub series: Vec<Bucket>,
}

impl Stats {
    pub fn new(config: StatsConfig) -> Stats {
        Stats {
            config,
            ok: histogram(3),
            rejected: histogram(3),
            refused: histogram(3),
            codes: [0; CODES],
            good: 0,
            sent: 0,
            unsent: 0,
            unfinished: 0,
            lag: histogram(3),
            late: 0,
            series: Vec::new(),
        }
    }

    pub fn config(&self) -> &StatsConfig {
        &self.config
    }

    /// Whether an intended send time falls in the measurement window.
    pub fn in_window(&self, intended: Duration) -> bool {
        intended >= self.config.window_start && intended < self.config.window_end
    }

    /// Records one finished request.
    pub fn record(&mut self, outcome: &Outcome) {
        let latency = micros(outcome.latency());
        let ok = outcome.code == Code::Ok;
        let bucket = self.bucket(outcome.intended);
        bucket.sent += 1;
        if ok {
            bucket.ok += 1;
            record(&mut bucket.ok_latency, latency);
        } else {
            bucket.rejected += 1;
        }
        if !self.in_window(outcome.intended) {
            return;
        }
        self.record_send(outcome.lag());
        self.codes[code_index(outcome.code)] += 1;
        if ok {
            record(&mut self.ok, latency);
            if self.config.deadline.is_none_or(|d| outcome.latency() <= d) {
                self.good += 1;
            }
        } else {
            record(&mut self.rejected, latency);
            if is_refusal(outcome.code) {
                record(&mut self.refused, latency);
            }
        }
    }

    /// Records a request that was sent but never answered before the run ended.
    pub fn record_unfinished(&mut self, intended: Duration, lag: Duration) {
        if self.in_window(intended) {
            self.record_send(lag);
            self.unfinished += 1;
        }
    }

    /// Records a scheduled request the generator gave up sending.
    pub fn record_unsent(&mut self, intended: Duration) {
        if self.in_window(intended) {
            self.unsent += 1;
        }
    }

    fn record_send(&mut self, lag: Duration) {
        self.sent += 1;
        record(&mut self.lag, micros(lag));
        if lag > self.config.late_threshold {
            self.late += 1;
        }
    }

    fn bucket(&mut self, intended: Duration) -> &mut Bucket {
        let i = usize::try_from(intended.as_secs()).unwrap_or(usize::MAX);
        if self.series.len() <= i {
            self.series.resize_with(i + 1, Bucket::new);
        }
        &mut self.series[i]
    }

    /// Adds another worker's measurements to these.
    pub fn merge(&mut self, other: &Stats) {
        let merged = "auto-resizing histograms always merge";
        self.ok.add(&other.ok).expect(merged);
        self.rejected.add(&other.rejected).expect(merged);
        self.refused.add(&other.refused).expect(merged);
        self.lag.add(&other.lag).expect(merged);
        for (a, b) in self.codes.iter_mut().zip(other.codes) {
            *a += b;
        }
        self.good += other.good;
        self.sent += other.sent;
        self.unsent += other.unsent;
        self.unfinished += other.unfinished;
        self.late += other.late;
        if self.series.len() < other.series.len() {
            self.series.resize_with(other.series.len(), Bucket::new);
        }
        for (a, b) in self.series.iter_mut().zip(&other.series) {
            a.merge(b);
        }
    }

    /// Answers of any kind in the window.
    pub fn answered(&self) -> u64 {
        self.codes.iter().sum()
    }

    /// Successful answers in the window.
    pub fn successes(&self) -> u64 {
        self.codes[code_index(Code::Ok)]
    }
}

/// One point's measurements: the totals and, when requests carry priorities, the
/// same measurements per priority level.
///
/// Requests are recorded with their level's slot (an index into the levels given to
/// [`PointStats::new`]), or `None` when the run sends no priorities.
#[derive(Clone, Debug)]
pub struct PointStats {
    pub total: Stats,
    /// One entry per level, in the order of the mix; empty without priorities.
    pub by_priority: Vec<LevelStats>,
}

/// What the requests of one priority level measured.
#[derive(Clone, Debug)]
pub struct LevelStats {
    pub priority: u64,
    pub stats: Stats,
}

impl PointStats {
    pub fn new(config: StatsConfig, levels: impl IntoIterator<Item = u64>) -> PointStats {
        PointStats {
            total: Stats::new(config),
            by_priority: levels
                .into_iter()
                .map(|priority| LevelStats {
                    priority,
                    stats: Stats::new(config),
                })
                .collect(),
        }
    }

    /// See [`Stats::record`].
    pub fn record(&mut self, slot: Option<usize>, outcome: &Outcome) {
        self.each(slot, |s| s.record(outcome));
    }

    /// See [`Stats::record_unfinished`].
    pub fn record_unfinished(&mut self, slot: Option<usize>, intended: Duration, lag: Duration) {
        self.each(slot, |s| s.record_unfinished(intended, lag));
    }

    /// See [`Stats::record_unsent`].
    pub fn record_unsent(&mut self, slot: Option<usize>, intended: Duration) {
        self.each(slot, |s| s.record_unsent(intended));
    }

    /// Adds another worker's measurements (with the same levels) to these.
    pub fn merge(&mut self, other: &PointStats) {
        self.total.merge(&other.total);
        assert_eq!(
            self.by_priority.len(),
            other.by_priority.len(),
            "merged point stats have the same levels"
        );
        for (a, b) in self.by_priority.iter_mut().zip(&other.by_priority) {
            a.stats.merge(&b.stats);
        }
    }

    /// Applies a recording to the totals and to the slot's level.
    fn each(&mut self, slot: Option<usize>, mut f: impl FnMut(&mut Stats)) {
        f(&mut self.total);
        if let Some(i) = slot {
            f(&mut self.by_priority[i].stats);
        }
    }
}

impl From<Stats> for PointStats {
    /// Measurements of a run without priorities.
    fn from(total: Stats) -> PointStats {
        PointStats {
            total,
            by_priority: Vec::new(),
        }
    }
}

/// Records a value, growing the histogram as needed.
pub fn record(h: &mut Histogram<u64>, micros: u64) {
    // Auto-resizing histograms take any u64; `saturating_record` would clamp instead.
    h.record(micros)
        .expect("auto-resizing histograms record any value");
}

/// An empty auto-resizing histogram of microseconds.
pub fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new(sigfig).expect("1 to 5 significant digits is a valid histogram")
}

/// A duration in whole microseconds (at least 1, the histogram's lowest value).
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Whether a code says the server turned the request away (overload or quota), as
/// opposed to failing it or running out of time.
pub fn is_refusal(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

/// The position of a code in [`Stats::codes`].
pub fn code_index(code: Code) -> usize {
    usize::try_from(i32::from(code)).expect("gRPC codes are 0..=16")
}

/// The code at a position of [`Stats::codes`].
pub fn code_at(index: usize) -> Code {
    Code::from(i32::try_from(index).expect("index below CODES"))
}

/// The canonical upper-case name of a gRPC status code, as the gRPC spec spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn config() -> StatsConfig {
        StatsConfig {
            window_start: ms(1000),
            window_end: ms(3000),
            deadline: Some(ms(50)),
            late_threshold: ms(10),
        }
    }

    fn outcome(intended: u64, lag: u64, latency: u64, code: Code) -> Outcome {
        Outcome {
            intended: ms(intended),
            sent: ms(intended + lag),
            done: ms(intended + latency),
            code,
        }
    }

    #[test]
    fn latency_counts_from_the_earlier_of_intended_and_sent() {
        let at = |intended: u64, sent: u64, done: u64| Outcome {
            intended: ms(intended),
            sent: ms(sent),
            done: ms(done),
            code: Code::Ok,
        };
        // Sent late: the wait for the generator counts.
        assert_eq!(at(100, 104, 110).latency(), ms(10));
        assert_eq!(at(100, 104, 110).lag(), ms(4));
        // Sent early: only what the server took counts, and it is not lag.
        assert_eq!(at(100, 99, 110).latency(), ms(11));
        assert_eq!(at(100, 99, 110).lag(), ms(0));
    }

    #[test]
    fn records_by_outcome_window_and_deadline() {
        let mut s = Stats::new(config());
        s.record(&outcome(500, 0, 5, Code::Ok)); // warm-up: series only
        s.record(&outcome(1000, 0, 20, Code::Ok));
        s.record(&outcome(1500, 30, 80, Code::Ok)); // late, and past the deadline
        s.record(&outcome(2000, 0, 2, Code::Unavailable));
        s.record(&outcome(2100, 0, 50, Code::DeadlineExceeded));
        s.record(&outcome(3000, 0, 5, Code::Ok)); // after the window
        s.record_unfinished(ms(2500), ms(0));
        s.record_unsent(ms(2600));
        s.record_unsent(ms(3600));

        assert_eq!(s.successes(), 2);
        assert_eq!(s.good, 1);
        assert_eq!(s.answered(), 4);
        assert_eq!(s.codes[code_index(Code::Unavailable)], 1);
        assert_eq!(s.sent, 5);
        assert_eq!((s.unsent, s.unfinished, s.late), (1, 1, 1));
        assert_eq!(s.ok.len(), 2);
        // Both failures are rejected; only the UNAVAILABLE one was refused.
        assert_eq!(s.rejected.len(), 2);
        assert!(s.rejected.equivalent(s.rejected.max(), 50_000));
        assert_eq!(s.refused.len(), 1);
        assert!(s.refused.equivalent(s.refused.max(), 2000));
        assert!(s.ok.equivalent(s.ok.max(), 80_000));
        assert!(s.ok.equivalent(s.ok.min(), 20_000));
        assert!(s.lag.equivalent(s.lag.max(), 30_000));
        assert_eq!(s.series.len(), 4);
        assert_eq!(s.series.iter().map(|b| b.sent).sum::<u64>(), 6);
        assert_eq!((s.series[0].ok, s.series[2].rejected), (1, 2));
    }

    #[test]
    fn merged_stats_equal_one_recorder_seeing_everything() {
        let outcomes: Vec<Outcome> = (0..2000)
            .map(|i| {
                let code = if i % 7 == 0 {
                    Code::ResourceExhausted
                } else {
                    Code::Ok
                };
                outcome(1000 + i, i % 13, 1 + (i * 37) % 400, code)
            })
            .collect();
        let mut whole = Stats::new(config());
        let mut parts = [
            Stats::new(config()),
            Stats::new(config()),
            Stats::new(config()),
        ];
        for (i, o) in outcomes.iter().enumerate() {
            whole.record(o);
            parts[i % 3].record(o);
        }
        let (first, rest) = parts.split_first_mut().unwrap();
        for p in rest.iter() {
            first.merge(p);
        }
        let merged = first;
        assert_eq!(merged.ok, whole.ok);
        assert_eq!(merged.rejected, whole.rejected);
        assert_eq!(merged.lag, whole.lag);
        assert_eq!(merged.codes, whole.codes);
        assert_eq!(
            (merged.good, merged.sent, merged.late),
            (whole.good, whole.sent, whole.late)
        );
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(
                merged.ok.value_at_quantile(q),
                whole.ok.value_at_quantile(q)
            );
        }
        assert_eq!(merged.series.len(), whole.series.len());
        for (a, b) in merged.series.iter().zip(&whole.series) {
            assert_eq!((a.sent, a.ok, a.rejected), (b.sent, b.ok, b.rejected));
            assert_eq!(a.ok_latency, b.ok_latency);
        }
    }

    #[test]
    fn merge_extends_a_shorter_series() {
        let mut short = Stats::new(config());
        short.record(&outcome(100, 0, 1, Code::Ok));
        let mut long = Stats::new(config());
        long.record(&outcome(5100, 0, 1, Code::Ok));
        short.merge(&long);
        assert_eq!(short.series.len(), 6);
        assert_eq!((short.series[0].ok, short.series[5].ok), (1, 1));
    }

    #[test]
    fn point_stats_record_totals_and_each_level() {
        let mut a = PointStats::new(config(), [1, 2]);
        let mut b = PointStats::new(config(), [1, 2]);
        a.record(Some(0), &outcome(1000, 0, 5, Code::Ok));
        a.record(Some(1), &outcome(1001, 0, 7, Code::Unavailable));
        b.record(Some(1), &outcome(1002, 0, 9, Code::Ok));
        b.record_unfinished(Some(0), ms(1003), ms(0));
        b.record_unsent(Some(1), ms(1004));
        a.merge(&b);

        let (p1, p2) = (&a.by_priority[0], &a.by_priority[1]);
        assert_eq!((p1.priority, p2.priority), (1, 2));
        assert_eq!((a.total.sent, p1.stats.sent, p2.stats.sent), (4, 2, 2));
        assert_eq!((p1.stats.successes(), p2.stats.successes()), (1, 1));
        assert_eq!(p2.stats.codes[code_index(Code::Unavailable)], 1);
        assert_eq!((p1.stats.unfinished, p2.stats.unsent), (1, 1));
        assert_eq!(a.total.answered(), 3);
        assert!(p2.stats.ok.equivalent(p2.stats.ok.max(), 9000));

        let mut plain = PointStats::from(Stats::new(config()));
        plain.record(None, &outcome(1000, 0, 5, Code::Ok));
        assert_eq!(plain.total.successes(), 1);
        assert!(plain.by_priority.is_empty());
    }

    #[test]
    fn codes_round_trip_and_have_canonical_names() {
        for i in 0..CODES {
            assert_eq!(code_index(code_at(i)), i);
        }
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(code_at(4)), "DEADLINE_EXCEEDED");
    }
}
