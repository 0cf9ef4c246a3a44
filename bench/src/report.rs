//! Turning measurements into results: per-point summaries, warnings, the final
//! table and the JSON result file.
//!
//! Latencies are in milliseconds, rates in requests per second. Throughput counts
//! successes; goodput counts successes that arrived within the deadline (all
//! successes when there is none). In open loop a schedule section says whether the
//! generator kept to its schedule; when it did not, the point carries a warning.
//! A run with a priority mix also has each point's results per priority level.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::schedule::Profile;
use crate::stats::{code_at, code_name, LevelStats, PointStats, Stats};

/// More than this fraction of sends late means the generator fell behind.
pub const LATE_FRACTION_LIMIT: f64 = 0.01;

/// A whole run: one or more points against one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub name: String,
    pub target: TargetInfo,
    /// `closed`, `open` or `profile`.
    pub mode: String,
    pub points: Vec<PointReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub url: String,
    pub model: String,
    pub version: String,
    pub batch_size: usize,
    pub connections: usize,
}

/// The results of one point (one concurrency, one rate, or one profile).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointReport {
    pub label: String,
    /// Closed loop: the number of clients.
    pub concurrency: Option<usize>,
    /// Open loop: the mean offered rate over the measurement window.
    pub offered_rps: Option<f64>,
    /// Length of the measurement window (warm-up excluded).
    pub window_s: f64,
    pub sent: u64,
    pub answered: u64,
    /// Scheduled in the window but never sent (the generator fell behind).
    pub unsent: u64,
    /// Sent but not answered by the end of the drain period.
    pub unfinished: u64,
    /// Answers per gRPC status code, by canonical name.
    pub codes: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Successful requests per second times the batch size.
    pub inferences_per_s: f64,
    /// Successes within the deadline per second.
    pub goodput_rps: f64,
    pub deadline_ms: Option<f64>,
    pub latency_ms: Latencies,
    /// Open loop only: how well the generator kept to its schedule.
    pub schedule: Option<ScheduleHealth>,
    /// Per second of the run, warm-up included.
    pub series: Vec<SeriesPoint>,
    pub warnings: Vec<String>,
    /// With a priority mix: the same counts per level, in the order of the mix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_priority: Vec<PriorityReport>,
}

impl PointReport {
    /// Successful answers in the window.
    pub fn successes(&self) -> u64 {
        self.codes.get(code_name(Code::Ok)).copied().unwrap_or(0)
    }
}

/// The results of one priority level's requests at a point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriorityReport {
    pub priority: u64,
    pub sent: u64,
    /// Successful answers.
    pub ok: u64,
    /// Successful requests per second.
    pub ok_rps: f64,
    /// Successes within the deadline per second.
    pub goodput_rps: f64,
    /// `ok / sent`; None when no request of this level was sent.
    pub success_ratio: Option<f64>,
    /// Non-OK answers: rejections, expired deadlines, errors.
    pub rejected: u64,
    pub latency_ms: Latencies,
    /// Answers per gRPC status code, by canonical name.
    pub codes: BTreeMap<String, u64>,
}

impl PriorityReport {
    pub fn of(level: &LevelStats) -> PriorityReport {
        let stats = &level.stats;
        PriorityReport {
            priority: level.priority,
            sent: stats.sent,
            ok: stats.successes(),
            ok_rps: per_second(stats, stats.successes()),
            goodput_rps: per_second(stats, stats.good),
            success_ratio: success_ratio(stats.successes(), stats.sent),
            rejected: stats.answered() - stats.successes(),
            latency_ms: Latencies::of(stats),
            codes: codes(stats),
        }
    }
}

/// Latency from the intended send time to the answer, by outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub ok: Option<Summary>,
    /// Every non-OK answer: rejections, expired deadlines, errors.
    pub rejected: Option<Summary>,
    /// The refusals among them: UNAVAILABLE and RESOURCE_EXHAUSTED.
    #[serde(default)]
    pub refused: Option<Summary>,
}

impl Latencies {
    pub fn of(stats: &Stats) -> Latencies {
        Latencies {
            ok: Summary::of(&stats.ok),
            rejected: Summary::of(&stats.rejected),
            refused: Summary::of(&stats.refused),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes a histogram of microseconds in milliseconds (None when empty).
    pub fn of(h: &Histogram<u64>) -> Option<Summary> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!h.is_empty()).then(|| Summary {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleHealth {
    pub late_threshold_ms: f64,
    /// Sends more than the threshold behind schedule.
    pub late: u64,
    pub late_fraction: f64,
    pub p50_lag_ms: f64,
    pub p99_lag_ms: f64,
    pub max_lag_ms: f64,
    pub unsent: u64,
    /// The generator could not deliver the offered load: results understate it.
    pub fell_behind: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Start of the second, from the start of the point.
    pub t_s: f64,
    /// Open loop: the profile's mean rate in this second.
    pub offered_rps: Option<f64>,
    pub sent: u64,
    pub ok: u64,
    pub rejected: u64,
    pub ok_p99_ms: Option<f64>,
}

/// What a point was, besides what it measured.
#[derive(Clone, Copy, Debug)]
pub struct PointMeta<'a> {
    pub label: &'a str,
    pub concurrency: Option<usize>,
    /// Open loop: the offered profile.
    pub profile: Option<&'a Profile>,
    pub batch_size: usize,
}

/// Summarizes one point's merged measurements.
pub fn point(point_stats: &PointStats, meta: &PointMeta<'_>) -> PointReport {
    let stats = &point_stats.total;
    let cfg = *stats.config();
    let window = window(stats);
    let per_s = |n: u64| per_second(stats, n);
    let schedule = meta.profile.map(|_| schedule_health(stats));
    let series = stats
        .series
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let t = Duration::from_secs(i as u64);
            SeriesPoint {
                t_s: t.as_secs_f64(),
                offered_rps: meta
                    .profile
                    .map(|p| p.expected_between(t, t + Duration::from_secs(1))),
                sent: b.sent,
                ok: b.ok,
                rejected: b.rejected,
                ok_p99_ms: (!b.ok_latency.is_empty())
                    .then(|| b.ok_latency.value_at_quantile(0.99) as f64 / 1000.0),
            }
        })
        .collect();
    let mut report = PointReport {
        label: meta.label.to_owned(),
        concurrency: meta.concurrency,
        offered_rps: meta
            .profile
            .map(|p| p.expected_between(cfg.window_start, cfg.window_end) / window.as_secs_f64()),
        window_s: window.as_secs_f64(),
        sent: stats.sent,
        answered: stats.answered(),
        unsent: stats.unsent,
        unfinished: stats.unfinished,
        codes: codes(stats),
        throughput_rps: per_s(stats.successes()),
        inferences_per_s: per_s(stats.successes()) * meta.batch_size as f64,
        goodput_rps: per_s(stats.good),
        deadline_ms: cfg.deadline.map(|d| d.as_secs_f64() * 1000.0),
        latency_ms: Latencies::of(stats),
        schedule,
        series,
        warnings: Vec::new(),
        by_priority: point_stats
            .by_priority
            .iter()
            .map(PriorityReport::of)
            .collect(),
    };
    report.warnings = warnings(&report);
    report
}

/// The measurement window.
fn window(stats: &Stats) -> Duration {
    let cfg = stats.config();
    cfg.window_end.saturating_sub(cfg.window_start)
}

/// `n` requests in the measurement window, per second.
fn per_second(stats: &Stats, n: u64) -> f64 {
    let window = window(stats);
    if window.is_zero() {
        0.0
    } else {
        n as f64 / window.as_secs_f64()
    }
}

/// The answers per gRPC status, by canonical name, leaving out codes never seen.
fn codes(stats: &Stats) -> BTreeMap<String, u64> {
    (0..stats.codes.len())
        .filter(|i| stats.codes[*i] > 0)
        .map(|i| (code_name(code_at(i)).to_owned(), stats.codes[i]))
        .collect()
}

fn success_ratio(ok: u64, sent: u64) -> Option<f64> {
    (sent > 0).then(|| ok as f64 / sent as f64)
}

fn schedule_health(stats: &Stats) -> ScheduleHealth {
    let late_fraction = if stats.sent == 0 {
        0.0
    } else {
        stats.late as f64 / stats.sent as f64
    };
    ScheduleHealth {
        late_threshold_ms: stats.config().late_threshold.as_secs_f64() * 1000.0,
        late: stats.late,
        late_fraction,
        p50_lag_ms: stats.lag.value_at_quantile(0.5) as f64 / 1000.0,
        p99_lag_ms: stats.lag.value_at_quantile(0.99) as f64 / 1000.0,
        max_lag_ms: stats.lag.max() as f64 / 1000.0,
        unsent: stats.unsent,
        fell_behind: stats.unsent > 0 || late_fraction > LATE_FRACTION_LIMIT,
    }
}

/// Everything about a point that makes its numbers suspect, in words.
pub fn warnings(p: &PointReport) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = p.schedule.as_ref().filter(|s| s.fell_behind) {
        let mut w = format!(
            "{}: the load generator fell behind its schedule: {} of {} requests ({:.1}%) were sent more than {} ms late (max lag {:.1} ms)",
            p.label,
            s.late,
            p.sent,
            s.late_fraction * 100.0,
            s.late_threshold_ms,
            s.max_lag_ms
        );
        if s.unsent > 0 {
            let _ = write!(w, " and {} scheduled requests were never sent", s.unsent);
        }
        w.push_str(
            "; the offered load was not delivered. Latencies still count from the intended send times, \
             but raise --max-in-flight, add --connections, or free CPU for the generator",
        );
        out.push(w);
    }
    if p.unfinished > 0 {
        out.push(format!(
            "{}: {} requests had no answer when the drain period ended",
            p.label, p.unfinished
        ));
    }
    if p.sent == 0 {
        out.push(format!(
            "{}: no request was sent in the measurement window",
            p.label
        ));
    }
    out
}

/// One row of the table: a point, or one priority level of a point.
struct Row<'a> {
    label: String,
    sent: u64,
    ok_rps: f64,
    goodput_rps: f64,
    latency: &'a Latencies,
    late: Option<u64>,
    success_ratio: Option<f64>,
    codes: &'a BTreeMap<String, u64>,
}

impl Row<'_> {
    /// Writes the row; `ratio`: with the success ratio column.
    fn write(&self, out: &mut String, ratio: bool) {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let ok = self.latency.ok.as_ref();
        let rej = self.latency.rejected.as_ref();
        let _ = write!(
            out,
            "{:<14} {:>8} {:>9.1} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
            self.label,
            self.sent,
            self.ok_rps,
            self.goodput_rps,
            ms(ok.map(|s| s.p50)),
            ms(ok.map(|s| s.p90)),
            ms(ok.map(|s| s.p99)),
            ms(ok.map(|s| s.p999)),
            rej.map_or(0, |s| s.count),
            ms(rej.map(|s| s.p99)),
            self.late.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        );
        if ratio {
            let percent = self
                .success_ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{:.1}", r * 100.0));
            let _ = write!(out, " {percent:>6}");
        }
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = writeln!(out, "  {}", codes.join(", "));
    }
}

/// The final table: one row per point and, with a priority mix, one more per level
/// (`  prio N`) and a column with the fraction of requests that succeeded.
pub fn table(report: &RunReport) -> String {
    let mut out = String::new();
    let t = &report.target;
    let _ = writeln!(
        out,
        "{} | model {} | {} | batch {} | {} connection(s) | {}",
        report.name,
        t.model,
        t.url,
        t.batch_size,
        t.connections,
        match report.mode.as_str() {
            "closed" => "closed loop",
            "open" => "open loop",
            _ => "open loop, rate profile",
        }
    );
    let ratio = report.points.iter().any(|p| !p.by_priority.is_empty());
    let _ = write!(
        out,
        "{:<14} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "point",
        "sent",
        "ok/s",
        "good/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "rejected",
        "rej p99",
        "late"
    );
    if ratio {
        let _ = write!(out, " {:>6}", "ok %");
    }
    let _ = writeln!(out, "  codes");
    for p in &report.points {
        Row {
            label: p.label.clone(),
            sent: p.sent,
            ok_rps: p.throughput_rps,
            goodput_rps: p.goodput_rps,
            latency: &p.latency_ms,
            late: p.schedule.as_ref().map(|s| s.late),
            success_ratio: success_ratio(p.successes(), p.sent),
            codes: &p.codes,
        }
        .write(&mut out, ratio);
        for level in &p.by_priority {
            Row {
                label: format!("  prio {}", level.priority),
                sent: level.sent,
                ok_rps: level.ok_rps,
                goodput_rps: level.goodput_rps,
                latency: &level.latency_ms,
                late: None,
                success_ratio: level.success_ratio,
                codes: &level.codes,
            }
            .write(&mut out, ratio);
        }
    }
    for w in report.points.iter().flat_map(|p| &p.warnings) {
        let _ = writeln!(out, "WARNING: {w}");
    }
    out
}

/// Writes the report as pretty-printed JSON.
pub fn write_json(report: &RunReport, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report).expect("reports always serialize");
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Outcome, StatsConfig};

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn stats(late_every: u64) -> PointStats {
        stats_with_levels(late_every, &[])
    }

    /// 200 requests over 2 s: every 10th UNAVAILABLE, every 4th 30 ms (past the 10 ms
    /// deadline), every `late_every`-th sent 20 ms late; with levels, request i has the
    /// (i mod levels)-th.
    fn stats_with_levels(late_every: u64, levels: &[u64]) -> PointStats {
        let config = StatsConfig {
            window_start: ms(0),
            window_end: ms(2000),
            deadline: Some(ms(10)),
            late_threshold: ms(5),
        };
        let mut s = PointStats::new(config, levels.iter().copied());
        for i in 0..200_u64 {
            let slot = (!levels.is_empty()).then(|| usize::try_from(i).unwrap() % levels.len());
            let code = if i % 10 == 0 {
                Code::Unavailable
            } else {
                Code::Ok
            };
            let lag = if i % late_every == 0 { 20 } else { 0 };
            let latency = if i % 4 == 0 { 30 } else { 2 };
            let outcome = Outcome {
                intended: ms(i * 10),
                sent: ms(i * 10 + lag),
                done: ms(i * 10 + latency),
                code,
            };
            s.record(slot, &outcome);
        }
        s
    }

    fn run(points: Vec<PointReport>) -> RunReport {
        RunReport {
            name: "demo".into(),
            target: TargetInfo {
                url: "http://127.0.0.1:8001".into(),
                model: "mlp".into(),
                version: String::new(),
                batch_size: 2,
                connections: 1,
            },
            mode: "open".into(),
            points,
        }
    }

    #[test]
    fn point_summary_counts_rates_and_codes() {
        let profile = Profile::steady(100.0, ms(2000)).unwrap();
        let meta = PointMeta {
            label: "rate=100/s",
            concurrency: None,
            profile: Some(&profile),
            batch_size: 2,
        };
        let p = point(&stats(1000), &meta);
        assert_eq!((p.sent, p.answered), (200, 200));
        assert_eq!(p.codes["OK"], 180);
        assert_eq!(p.codes["UNAVAILABLE"], 20);
        assert_eq!(p.throughput_rps, 90.0);
        assert_eq!(p.inferences_per_s, 180.0);
        // Successes at i % 4 == 0 take 30 ms, past the 10 ms deadline: 40 of the 180.
        assert_eq!(p.goodput_rps, 70.0);
        assert_eq!(p.offered_rps, Some(100.0));
        let ok = p.latency_ms.ok.unwrap();
        assert_eq!(ok.count, 180);
        assert!(
            (ok.p50 - 2.0).abs() < 0.01 && (ok.p99 - 30.0).abs() < 0.05,
            "{ok:?}"
        );
        assert_eq!(p.latency_ms.rejected.unwrap().count, 20);
        assert_eq!(p.latency_ms.refused.unwrap().count, 20);
        let s = p.schedule.unwrap();
        assert_eq!(s.late, 1);
        assert!(!s.fell_behind, "1 late send of 200 is within the limit");
        assert!(p.warnings.is_empty());
        assert_eq!(p.series.len(), 2);
        assert_eq!(p.series[1].offered_rps, Some(100.0));
    }

    #[test]
    fn falling_behind_is_flagged_and_warned() {
        let profile = Profile::steady(100.0, ms(2000)).unwrap();
        let meta = PointMeta {
            label: "rate=100/s",
            concurrency: None,
            profile: Some(&profile),
            batch_size: 1,
        };
        let p = point(&stats(2), &meta);
        let s = p.schedule.as_ref().unwrap();
        assert_eq!(s.late, 100);
        assert!(s.fell_behind);
        assert!((s.max_lag_ms - 20.0).abs() < 0.05, "{}", s.max_lag_ms);
        assert_eq!(p.warnings.len(), 1);
        assert!(
            p.warnings[0].contains("fell behind its schedule: 100 of 200 requests (50.0%)"),
            "{}",
            p.warnings[0]
        );
    }

    #[test]
    fn json_has_the_documented_fields() {
        let meta = PointMeta {
            label: "c=4",
            concurrency: Some(4),
            profile: None,
            batch_size: 1,
        };
        let report = run(vec![point(&stats(1000), &meta)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.json");
        write_json(&report, &path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["target"]["model"], "mlp");
        let p = &v["points"][0];
        assert_eq!(p["concurrency"], 4);
        assert!(p["offered_rps"].is_null());
        assert!(p["schedule"].is_null(), "closed loop has no schedule");
        assert_eq!(p["codes"]["OK"], 180);
        assert_eq!(p["throughput_rps"], 90.0);
        for key in ["count", "mean", "p50", "p90", "p99", "p999", "max"] {
            assert!(
                p["latency_ms"]["ok"][key].is_number(),
                "latency_ms.ok.{key}"
            );
        }
        assert_eq!(p["latency_ms"]["rejected"]["count"], 20);
        assert_eq!(p["series"][0]["sent"], 100);
        assert!(p.get("by_priority").is_none(), "no mix, no breakdown");
        let back: RunReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report);
    }

    fn closed_meta() -> PointMeta<'static> {
        PointMeta {
            label: "c=4",
            concurrency: Some(4),
            profile: None,
            batch_size: 1,
        }
    }

    #[test]
    fn priorities_are_summarized_per_level() {
        let p = point(&stats_with_levels(1000, &[1, 2]), &closed_meta());
        // The totals do not change with a breakdown.
        assert_eq!(
            PointReport {
                by_priority: Vec::new(),
                ..p.clone()
            },
            point(&stats(1000), &closed_meta())
        );
        let [one, two] = &p.by_priority[..] else {
            panic!("two levels: {:?}", p.by_priority)
        };
        // Level 1 has the even requests: the 20 UNAVAILABLE ones, and 40 of its 80
        // successes take 30 ms, past the deadline. Level 2 has the odd ones: all 2 ms OKs.
        assert_eq!(
            (one.priority, one.sent, one.ok, one.rejected),
            (1, 100, 80, 20)
        );
        assert_eq!((one.ok_rps, one.goodput_rps), (40.0, 20.0));
        assert_eq!(one.success_ratio, Some(0.8));
        assert_eq!(one.codes["UNAVAILABLE"], 20);
        assert_eq!(one.latency_ms.rejected.unwrap().count, 20);
        let ok = one.latency_ms.ok.unwrap();
        assert!(
            (ok.p50 - 2.0).abs() < 0.01 && (ok.p99 - 30.0).abs() < 0.05,
            "{ok:?}"
        );
        assert_eq!(
            (two.priority, two.sent, two.ok, two.rejected),
            (2, 100, 100, 0)
        );
        assert_eq!((two.ok_rps, two.goodput_rps), (50.0, 50.0));
        assert_eq!(two.success_ratio, Some(1.0));
        assert_eq!(two.codes.len(), 1);
        assert_eq!(two.latency_ms.rejected, None);
        assert!((two.latency_ms.ok.unwrap().p99 - 2.0).abs() < 0.01);

        let thirds = point(&stats_with_levels(1000, &[1, 2, 3]), &closed_meta());
        let three = &thirds.by_priority[2];
        assert_eq!(
            (three.sent, three.success_ratio),
            (66, Some(60.0 / 66.0)),
            "requests 2, 5, 8, ..."
        );
        let idle = PointStats::new(*stats(1000).total.config(), [7]);
        let unsent = &point(&idle, &closed_meta()).by_priority[0];
        assert_eq!(
            (unsent.priority, unsent.sent, unsent.success_ratio),
            (7, 0, None)
        );
    }

    #[test]
    fn json_has_a_breakdown_per_priority() {
        let report = run(vec![point(
            &stats_with_levels(1000, &[1, 2]),
            &closed_meta(),
        )]);
        let v = serde_json::to_value(&report).unwrap();
        let levels = v["points"][0]["by_priority"].as_array().unwrap();
        assert_eq!(levels.len(), 2);
        let one = &levels[0];
        assert_eq!(one["priority"], 1);
        assert_eq!(
            (one["sent"].as_u64(), one["ok"].as_u64()),
            (Some(100), Some(80))
        );
        assert_eq!(one["ok_rps"], 40.0);
        assert_eq!(one["goodput_rps"], 20.0);
        assert_eq!(one["success_ratio"], 0.8);
        assert_eq!(one["rejected"], 20);
        assert_eq!(one["codes"]["OK"], 80);
        for key in ["p50", "p99"] {
            assert!(
                one["latency_ms"]["ok"][key].is_number(),
                "latency_ms.ok.{key}"
            );
        }
        assert!(levels[1]["latency_ms"]["rejected"].is_null());
        let back: RunReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn table_has_a_row_per_priority_and_the_success_ratio() {
        let text = table(&run(vec![point(
            &stats_with_levels(1000, &[1, 2]),
            &closed_meta(),
        )]));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with("  late   ok %  codes"), "{}", lines[1]);
        assert!(
            lines[2].starts_with("c=4                 200      90.0      70.0")
                && lines[2].ends_with("     -   90.0  OK 180, UNAVAILABLE 20"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("  prio 1            100      40.0      20.0")
                && lines[3].ends_with("     -   80.0  OK 80, UNAVAILABLE 20"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].starts_with("  prio 2            100      50.0      50.0")
                && lines[4].ends_with("     -  100.0  OK 100"),
            "{}",
            lines[4]
        );
        assert_eq!(lines.len(), 5);
        let codes_at = lines[1].find("  codes").unwrap();
        for row in &lines[2..] {
            assert_eq!(&row[codes_at..codes_at + 4], "  OK", "{row}");
        }
    }

    #[test]
    fn table_has_one_aligned_row_per_point_and_warnings() {
        let closed = PointMeta {
            label: "c=4",
            concurrency: Some(4),
            profile: None,
            batch_size: 1,
        };
        let profile = Profile::steady(100.0, ms(2000)).unwrap();
        let open = PointMeta {
            label: "rate=100/s",
            concurrency: None,
            profile: Some(&profile),
            batch_size: 1,
        };
        let text = table(&run(vec![
            point(&stats(1000), &closed),
            point(&stats(2), &open),
        ]));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("demo | model mlp | http://127.0.0.1:8001 | batch 2"));
        assert!(lines[1].starts_with("point              sent      ok/s    good/s   p50 ms"));
        assert!(
            lines[2].starts_with("c=4                 200      90.0      70.0     2.00"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].ends_with("-  OK 180, UNAVAILABLE 20"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("rate=100/s          200      90.0"),
            "{}",
            lines[3]
        );
        // The columns line up: every row is as long as the header up to the codes.
        let codes_at = lines[1].find("  codes").unwrap();
        assert_eq!(&lines[2][codes_at..codes_at + 2], "  ");
        assert!(lines[4].starts_with("WARNING: rate=100/s: the load generator fell behind"));
    }
}
