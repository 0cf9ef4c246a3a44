//! The live view while a point runs: a progress bar on stderr with the current
//! answer rate, error count and p99 latency of the last second.
//!
//! Workers report every answer to a shared [`Live`] (atomics, plus one small
//! histogram under a mutex only while a bar is shown); a ticker task redraws the
//! bar four times a second. The bar is hidden when stderr is not a terminal or with
//! `--quiet`, and the final report never depends on it.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;

use crate::stats::{histogram, micros, record, Outcome};

const TICK: Duration = Duration::from_millis(250);
/// Rates and p99 on the bar cover about this much recent time.
const RECENT: Duration = Duration::from_secs(1);

/// Running totals shared by the workers of one point.
pub struct Live {
    answered: AtomicU64,
    errors: AtomicU64,
    /// Latencies of recent successes; None when nobody looks at them.
    recent: Option<Mutex<Histogram<u64>>>,
}

impl Live {
    /// `track_latency`: keep the recent-latency histogram (only the bar needs it).
    pub fn new(track_latency: bool) -> Arc<Live> {
        Arc::new(Live {
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recent: track_latency.then(|| Mutex::new(histogram(2))),
        })
    }

    pub fn observe(&self, outcome: &Outcome) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if outcome.code != Code::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else if let Some(recent) = &self.recent {
            let mut h = recent
                .lock()
                .expect("no code panics while holding the live histogram");
            record(&mut h, micros(outcome.latency()));
        }
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// p99 of the successes since the last call, in ms, and forgets them.
    fn take_p99_ms(&self) -> Option<f64> {
        let recent = self.recent.as_ref()?;
        let mut h = recent
            .lock()
            .expect("no code panics while holding the live histogram");
        let p99 = (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0);
        h.reset();
        p99
    }
}

/// Whether to draw a bar: stderr is a terminal and the user did not ask for quiet.
pub fn wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A bar being drawn for one point; call [`Progress::finish`] when the point ends.
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing `label`'s bar over `length`, fed by `live` (hidden if `!shown`).
    pub fn start(label: &str, length: Duration, live: &Arc<Live>, shown: bool) -> Progress {
        if !shown {
            return Progress {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let total_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        let bar = ProgressBar::with_draw_target(Some(total_ms), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template("{prefix:>14} [{bar:24}] {elapsed:>3} {msg}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            )
            .with_prefix(label.to_owned());
        let ticker = tokio::spawn(tick(bar.clone(), Arc::clone(live)));
        Progress {
            bar,
            ticker: Some(ticker),
        }
    }

    pub fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

async fn tick(bar: ProgressBar, live: Arc<Live>) {
    let start = Instant::now();
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut p99 = None;
    let mut last_p99 = start;
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let now = Instant::now();
        samples.push_back((now, live.answered()));
        while samples.len() > 2 && now.duration_since(samples[0].0) > RECENT {
            samples.pop_front();
        }
        if now.duration_since(last_p99) >= RECENT {
            p99 = live.take_p99_ms().or(p99);
            last_p99 = now;
        }
        bar.set_position(u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX));
        bar.set_message(message(&samples, live.errors(), p99));
    }
}

fn message(samples: &VecDeque<(Instant, u64)>, errors: u64, p99_ms: Option<f64>) -> String {
    let rate = match (samples.front(), samples.back()) {
        (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
            (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
        }
        _ => 0.0,
    };
    let p99 = p99_ms.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    format!("{rate:>8.0} req/s  errors {errors:<6} p99 {p99}")
}
