//! The end of a window: its judgement (the module's formula) and the floors it ends on.

use std::time::Duration;

use tokio::time::Instant;

use super::state::{Load, State};
use super::{
    AdaptiveLimit, BETA, BURST_HEADROOM, CLEAR_OVERSHOOT, CLEAR_OVERSHOOT_UNREFUSED, GROWTH,
    PERSISTENCE, PERSISTENCE_UNREFUSED, UTILIZATION,
};

impl AdaptiveLimit {
    /// Whether a window with this `overshoot` (the module's `o`) makes a standing queue
    /// (counting the window into the streak of windows over). A window over is a
    /// standing queue when the ones before it were over too, or when it is far over: a
    /// single burst (Poisson arrivals at 80% load make them) shrinks nothing. Without
    /// refusals it takes more to convince, and a queue that one round of full batches
    /// clears is not a backlog, however long it took to form.
    fn queue_stands(&self, s: &mut State, overshoot: f64) -> bool {
        let over = overshoot > 1.0;
        s.over_streak = if over { s.over_streak + 1 } else { 0 };
        let (persistence, clear) = if s.window_refused {
            (PERSISTENCE, CLEAR_OVERSHOOT)
        } else {
            (PERSISTENCE_UNREFUSED, CLEAR_OVERSHOOT_UNREFUSED)
        };
        let backlog = s.window_refused || s.window_peak > self.model.round;
        backlog && over && (s.over_streak >= persistence || overshoot > f64::from(clear))
    }

    /// The floors a window's judgement ends on: level 1's (see `close_window`) and, in
    /// a `calm` window (the model keeps up, nothing was refused, the wait was within the
    /// target), room for twice the recent bursts.
    fn raise_to_floors(&self, s: &mut State, top_floor: f64, calm: bool) {
        if s.window_top_over {
            // Level 1 went past the limit by displacing lower levels: the limit it
            // will be held to if it stops keeping up is what it used, not what the
            // lower levels' flood left.
            s.limit = s.limit.max(top_floor);
        }
        if calm {
            // The overload that shrank the limit (if any) is over: the bursts of the
            // load the model keeps up with must not meet it.
            let room = (BURST_HEADROOM * s.recent_peak).min(self.config.max as f64);
            s.limit = s.limit.max(room);
        }
    }

    /// Judge the window that ends at `now` (see the module's formula), then open the next.
    pub(super) fn close_window(
        &self,
        s: &mut State,
        start: Instant,
        now: Instant,
        target: Duration,
    ) {
        let (min, max) = (self.config.min as f64, self.config.max as f64);
        let peak = s.window_peak as f64;
        let (d_mean, d_held) = s.mean_waits();
        let over = d_mean > target;
        // The overshoot `o` of the module's formula: the wait against the target, and
        // the wait plus the excess execution against the target plus the allowance.
        let held_target = target.saturating_add(self.allowance_of(s));
        let overshoot = (d_mean.as_secs_f64() / target.as_secs_f64())
            .max(d_held.as_secs_f64() / held_target.as_secs_f64());
        // Judged every window: it counts the window into the streak.
        let stands = self.queue_stands(s, overshoot);
        let Load {
            overloaded,
            top_keeps_up,
        } = s.load(start, now);
        s.note_peak(start, now, !overloaded);
        let standing = overloaded && stands;
        s.top_keeps_up = top_keeps_up;
        // Refusals of level 1 count as offered and not finished, so once a stall has
        // made it fall behind they keep it "not keeping up"; its own wait within the
        // target while lower levels share the window says the limit is what holds it.
        let top_wait = s.top_mean_wait();
        let top_within = s.window_top_count > 0 && top_wait <= target;
        let shared = s.window_offered > s.window_top_offered;
        let top_held_back = s.window_top_refused && (top_keeps_up || shared && top_within);
        // While level 1 is served at the rate it asks, the overload is the lower
        // levels': the limit need not shrink below what level 1 itself used, with room
        // for its bursts (its share is the whole limit, so whatever lower levels hold
        // above that is preempted for it).
        let top_floor = if top_keeps_up {
            (s.window_top_peak as f64 / UTILIZATION).min(max)
        } else {
            0.0
        };
        if top_held_back {
            s.limit = (s.limit * GROWTH).min(max);
        } else if standing && peak > min {
            let factor = overshoot.recip().max(BETA);
            s.limit = (s.limit.min(peak) * factor).max(top_floor).max(min);
        } else if !overloaded && s.window_refused {
            // Refused while the model kept up with what it was offered: the limit is
            // in the way of serveable load.
            s.limit = (s.limit * GROWTH).min(max);
        } else if (overshoot <= 1.0 || !overloaded) && peak >= UTILIZATION * s.limit.floor() {
            s.limit = (s.limit + s.limit.sqrt().max(1.0)).min(max);
        }
        self.raise_to_floors(s, top_floor, !overloaded && !s.window_refused && !over);
        log_window(s, overloaded, standing, target);
        s.open_window(now);
    }
}

/// The window's judgement in the debug log (`--log-level warn,sluice::limit=debug`).
fn log_window(s: &State, overloaded: bool, standing: bool, target: Duration) {
    let (d_mean, d_held) = s.mean_waits();
    let top_wait = s.top_mean_wait();
    tracing::debug!(
        limit = s.limit,
        peak = s.window_peak,
        top_peak = s.window_top_peak,
        overloaded,
        top_keeps_up = s.top_keeps_up,
        top_refused = s.window_top_refused,
        standing,
        d_mean_ms = d_mean.as_secs_f64() * 1e3,
        d_held_ms = d_held.as_secs_f64() * 1e3,
        top_wait_ms = top_wait.as_secs_f64() * 1e3,
        target_ms = target.as_secs_f64() * 1e3,
        "concurrency limit window"
    );
}
