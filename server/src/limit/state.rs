//! The adaptive limit's bookkeeping: what is in flight per level, the counts of the
//! current window, and the smoothed load they fold into.

use std::time::Duration;

use tokio::time::Instant;

use super::{BURST_TAU, IDLE_AFTER, LOAD_TAU, OVERLOAD};

/// The load of the windows up to now, smoothed over [`LOAD_TAU`].
pub(super) struct Load {
    /// More is asked of the model than it finishes.
    pub(super) overloaded: bool,
    /// Priority level 1 alone is finished at the rate it is asked (the overload, if
    /// any, is the lower levels').
    pub(super) top_keeps_up: bool,
}

/// The weight `exp(-t / tau)` that what was counted up to `start` keeps at `now`.
fn decay(start: Instant, now: Instant, tau: Duration) -> f64 {
    (-now.duration_since(start).as_secs_f64() / tau.as_secs_f64()).exp()
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) limit: f64,
    pub(super) window_start: Option<Instant>,
    pub(super) window_sum: Duration,
    /// The same waits with each request's excess execution added: how long work was
    /// held up by a backlog, in the queue or in a batch it swelled.
    pub(super) window_held_sum: Duration,
    pub(super) window_count: u32,
    /// The same two for the requests of priority level 1 alone (its mean wait, shown in
    /// the window log).
    pub(super) window_top_sum: Duration,
    pub(super) window_top_count: u32,
    pub(super) window_peak: usize,
    /// The most level-1 requests in flight during the window.
    pub(super) window_top_peak: usize,
    /// The model's fastest reported execution time for one sample.
    pub(super) unit: Option<Duration>,
    /// In flight per priority level (index `level - 1`).
    pub(super) by_level: Vec<usize>,
    /// Windows in a row whose mean wait was over the target.
    pub(super) over_streak: u32,
    /// A request was refused in the window.
    pub(super) window_refused: bool,
    /// Requests that asked for a slot in the window, admitted or not,
    pub(super) window_offered: u32,
    /// and those served in it (answered, not expired).
    pub(super) window_served: u32,
    /// The same two for priority level 1 alone,
    pub(super) window_top_offered: u32,
    pub(super) window_top_served: u32,
    /// and whether a level-1 request was refused in the window,
    pub(super) window_top_refused: bool,
    /// or admitted past the whole limit (displacing lower levels).
    pub(super) window_top_over: bool,
    /// Level 1 alone was served at the rate it asked, as last judged (at the end of the
    /// last window; true before the first).
    pub(super) top_keeps_up: bool,
    /// Offered and finished requests, summed over windows with weights decaying over
    /// [`LOAD_TAU`].
    pub(super) offered: f64,
    pub(super) finished: f64,
    pub(super) top_offered: f64,
    pub(super) top_finished: f64,
    /// In flight (all levels, level 1) when the window opened,
    pub(super) window_start_in_flight: (usize, usize),
    /// and how much that count grew, summed over windows like the counts above: the
    /// part of what was offered that is still in flight, not yet to be judged.
    pub(super) growth: f64,
    pub(super) top_growth: f64,
    /// The most requests in flight in a window the model kept up with, as a maximum
    /// decaying over [`BURST_TAU`].
    pub(super) recent_peak: f64,
    /// When the last request finished (served or not), moved on to the moment the
    /// limit last relaxed for the idle time since.
    pub(super) last_finished: Option<Instant>,
}

impl State {
    pub(super) fn new(limit: f64) -> State {
        State {
            limit,
            window_start: None,
            window_sum: Duration::ZERO,
            window_held_sum: Duration::ZERO,
            window_count: 0,
            window_top_sum: Duration::ZERO,
            window_top_count: 0,
            window_peak: 0,
            window_top_peak: 0,
            unit: None,
            by_level: Vec::new(),
            over_streak: 0,
            window_refused: false,
            window_offered: 0,
            window_served: 0,
            window_top_offered: 0,
            window_top_served: 0,
            window_top_refused: false,
            window_top_over: false,
            top_keeps_up: true,
            offered: 0.0,
            finished: 0.0,
            top_offered: 0.0,
            top_finished: 0.0,
            window_start_in_flight: (0, 0),
            growth: 0.0,
            top_growth: 0.0,
            recent_peak: 0.0,
            last_finished: None,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.by_level.iter().sum()
    }

    /// One request of level `index` (from 0) offered to the limit.
    pub(super) fn count_offer(&mut self, index: usize) {
        self.window_offered = self.window_offered.saturating_add(1);
        if index == 0 {
            self.window_top_offered = self.window_top_offered.saturating_add(1);
        }
    }

    /// One request of level `index` offered and refused. Only a refusal of the highest
    /// level in flight says the limit binds: one of a lower level means higher levels are
    /// taking their precedence.
    pub(super) fn count_refusal(&mut self, index: usize) {
        self.count_offer(index);
        if self.by_level.iter().take(index).all(|&n| n == 0) {
            self.window_refused = true;
        }
        self.window_top_refused |= index == 0;
    }

    /// The window's mean wait and mean held time (wait plus excess execution).
    pub(super) fn mean_waits(&self) -> (Duration, Duration) {
        let n = self.window_count.max(1);
        (self.window_sum / n, self.window_held_sum / n)
    }

    /// Level 1's mean wait in the window.
    pub(super) fn top_mean_wait(&self) -> Duration {
        self.window_top_sum / self.window_top_count.max(1)
    }

    /// Start a window at `now`: its counts from zero, its peak from what is in flight.
    pub(super) fn open_window(&mut self, now: Instant) {
        self.window_start = Some(now);
        self.window_sum = Duration::ZERO;
        self.window_held_sum = Duration::ZERO;
        self.window_count = 0;
        self.window_top_sum = Duration::ZERO;
        self.window_top_count = 0;
        self.window_refused = false;
        self.window_offered = 0;
        self.window_served = 0;
        self.window_top_offered = 0;
        self.window_top_served = 0;
        self.window_top_refused = false;
        self.window_top_over = false;
        self.window_start_in_flight = (
            self.in_flight(),
            self.by_level.first().copied().unwrap_or(0),
        );
        self.window_peak = self.in_flight();
        self.window_top_peak = self.by_level.first().copied().unwrap_or(0);
    }

    /// Fold the window's peak into the decaying maximum of recent ones, if it `counts`
    /// (the load of an overloaded window is not one to make room for).
    pub(super) fn note_peak(&mut self, start: Instant, now: Instant, counts: bool) {
        self.recent_peak *= decay(start, now, BURST_TAU);
        if counts {
            self.recent_peak = self.recent_peak.max(self.window_peak as f64);
        }
    }

    /// With nothing in flight since the last request finished more than [`IDLE_AFTER`]
    /// ago, let the limit return toward `max` as an overload's evidence ages: the gap
    /// to `max` keeps the weight `exp(-t / BURST_TAU)` over the idle time `t`.
    pub(super) fn relax_when_idle(&mut self, now: Instant, max: f64) {
        let Some(last) = self.last_finished else {
            return;
        };
        if self.in_flight() > 0 || now.saturating_duration_since(last) <= IDLE_AFTER {
            return;
        }
        self.limit = max - (max - self.limit) * decay(last, now, BURST_TAU);
        self.last_finished = Some(now);
    }

    /// Fold the window's counts into the smoothed ones and judge the load.
    pub(super) fn load(&mut self, start: Instant, now: Instant) -> Load {
        // True overload: more is asked of the model than it finishes. Below capacity
        // a queue, however long, is served at the rate it is offered.
        let decay = decay(start, now, LOAD_TAU);
        self.offered = self.offered * decay + f64::from(self.window_offered);
        self.finished = self.finished * decay + f64::from(self.window_served);
        // What is still in flight of what was offered is not judged yet: a load that
        // starts fills the pipeline before anything finishes.
        let top_in_flight = self.by_level.first().copied().unwrap_or(0);
        let (was, was_top) = self.window_start_in_flight;
        self.growth = self.growth * decay + (self.in_flight() as f64 - was as f64);
        self.top_growth = self.top_growth * decay + (top_in_flight as f64 - was_top as f64);
        self.top_offered = self.top_offered * decay + f64::from(self.window_top_offered);
        self.top_finished = self.top_finished * decay + f64::from(self.window_top_served);
        Load {
            overloaded: self.offered - self.growth.max(0.0) > OVERLOAD * self.finished,
            top_keeps_up: self.top_offered - self.top_growth.max(0.0)
                <= OVERLOAD * self.top_finished,
        }
    }
}
