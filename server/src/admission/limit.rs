//! Per-model concurrency limit: how many requests of one model may be in flight (queued
//! or running) at once. Over it a request is refused at once (UNAVAILABLE with pushback)
//! instead of joining a queue it would only time out in.
//!
//! In adaptive mode the limit follows the model's measured queue delay with AIMD
//! (additive increase, multiplicative decrease; Chiu & Jain, 1989) driven by CoDel's
//! standing-queue signal (Nichols & Jacobson, "Controlling Queue Delay", 2012): over a
//! window `W`, the *smallest* queue delay seen says whether a queue persisted through
//! the whole window (a burst that drains does not count). At the end of each window:
//!
//! ```text
//! peak < u * L:                     L unchanged
//! d_min > target:                   L <- max(L_min, L * max(beta, target / d_min))
//! d_min <= target:                  L <- min(L_max, L + alpha)
//! ```
//!
//! with `beta = 0.5` (at most halve per window), `alpha = 1`, `u = 0.8` and `peak` the
//! most requests in flight during the window. Only a limit that was (nearly) reached
//! moves: it is then what shapes the load, so an idle model's limit does not drift up,
//! and a queue delay that comes from elsewhere (a slow machine, a closed-loop client
//! below the limit) does not shrink it. The decrease is proportional
//! to the overshoot (a queue twice the target halves the limit), which brings a limit
//! that started high down to the model's capacity within a few windows after a step in
//! load. `target` is configured, or by default the model's measured time for one
//! execution (a queue longer than one batch is a standing queue), at least
//! [`MIN_TARGET`]. `W` is ten targets, within [`MIN_WINDOW`, `MAX_WINDOW`].
//!
//! In static mode the limit is fixed at `max`.
//!
//! Priorities: of `N` levels (1 the highest), level `p` may use the share
//! `(N - p + 1) / N` of the limit, so under pressure the lowest level is refused first
//! while the highest can still use all of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Floor of the automatic target queue delay.
pub const MIN_TARGET: Duration = Duration::from_millis(1);
pub const MIN_WINDOW: Duration = Duration::from_millis(10);
pub const MAX_WINDOW: Duration = Duration::from_millis(200);
const BETA: f64 = 0.5;
const ALPHA: f64 = 1.0;
const UTILIZATION: f64 = 0.8;
/// Weight of a new execution time in the running average (exponential smoothing).
const COMPUTE_SMOOTHING: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// AIMD on the queue delay, between `min` and `max`.
    Adaptive,
    /// Always `max`.
    Static,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    pub mode: LimitMode,
    pub min: usize,
    pub max: usize,
    /// Queue delay the adaptive limit aims at; `None`: one execution time.
    pub target: Option<Duration>,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            mode: LimitMode::Adaptive,
            min: 2,
            max: 256,
            target: None,
        }
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    window_start: Option<Instant>,
    window_min_delay: Option<Duration>,
    window_peak: usize,
    /// Running average of one execution's time, from completed requests.
    compute: Option<Duration>,
}

/// One model's limit and its in-flight count.
#[derive(Debug)]
pub struct AdaptiveLimit {
    config: LimitConfig,
    state: Mutex<State>,
}

/// A slot under the limit, returned when dropped.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<AdaptiveLimit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.lock().in_flight -= 1;
    }
}

impl AdaptiveLimit {
    /// Starts at `max`: nothing is refused until the model has shown a standing queue.
    pub fn new(config: LimitConfig) -> AdaptiveLimit {
        let config = LimitConfig {
            min: config.min.max(1),
            max: config.max.max(config.min.max(1)),
            ..config
        };
        AdaptiveLimit {
            config,
            state: Mutex::new(State {
                limit: config.max as f64,
                in_flight: 0,
                window_start: None,
                window_min_delay: None,
                window_peak: 0,
                compute: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("limit state is never poisoned")
    }

    /// The current limit (whole requests).
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Take a slot for a request of `level` (1 the highest) of `levels`, or `None` when
    /// the level's share of the limit is in use.
    pub fn try_acquire(self: &Arc<Self>, level: u32, levels: u32) -> Option<Permit> {
        let mut s = self.lock();
        let levels = levels.max(1);
        let level = level.clamp(1, levels);
        let share = f64::from(levels - level + 1) / f64::from(levels);
        let allowed = (s.limit * share).floor().max(1.0) as usize;
        if s.in_flight >= allowed {
            return None;
        }
        s.in_flight += 1;
        s.window_peak = s.window_peak.max(s.in_flight);
        Some(Permit {
            limit: self.clone(),
        })
    }

    /// The queue delay target now in force.
    pub fn target(&self) -> Duration {
        let s = self.lock();
        self.target_of(&s)
    }

    fn target_of(&self, s: &State) -> Duration {
        self.config
            .target
            .unwrap_or_else(|| s.compute.unwrap_or(MIN_TARGET).max(MIN_TARGET))
    }

    /// Feed one completed request: how long it waited in the queue and how long its
    /// execution took. Returns the limit after any adjustment.
    pub fn on_sample(&self, queue_delay: Duration, compute: Duration, now: Instant) -> usize {
        let mut s = self.lock();
        s.compute = Some(match s.compute {
            None => compute,
            Some(avg) => avg.mul_f64(1.0 - COMPUTE_SMOOTHING) + compute.mul_f64(COMPUTE_SMOOTHING),
        });
        if self.config.mode == LimitMode::Static {
            return s.limit as usize;
        }
        s.window_min_delay = Some(
            s.window_min_delay
                .map_or(queue_delay, |d| d.min(queue_delay)),
        );
        let target = self.target_of(&s);
        let window = (target * 10).clamp(MIN_WINDOW, MAX_WINDOW);
        let start = *s.window_start.get_or_insert(now);
        if now.duration_since(start) >= window {
            let d_min = s.window_min_delay.unwrap_or_default();
            let (min, max) = (self.config.min as f64, self.config.max as f64);
            let binding = s.window_peak as f64 >= UTILIZATION * s.limit.floor();
            if binding && d_min > target {
                let factor = (target.as_secs_f64() / d_min.as_secs_f64()).max(BETA);
                s.limit = (s.limit * factor).max(min);
            } else if binding {
                s.limit = (s.limit + ALPHA).min(max);
            }
            s.window_start = Some(now);
            s.window_min_delay = None;
            s.window_peak = s.in_flight;
        }
        s.limit as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn adaptive(min: usize, max: usize, target_ms: u64) -> Arc<AdaptiveLimit> {
        Arc::new(AdaptiveLimit::new(LimitConfig {
            mode: LimitMode::Adaptive,
            min,
            max,
            target: Some(MS * target_ms as u32),
        }))
    }

    /// The window for a 5 ms target is 50 ms.
    const WINDOW: Duration = Duration::from_millis(50);

    /// Close `n` windows in which the limit is reached (every slot taken), each with one
    /// sample of `delay` at its end (the first call on a fresh limit opens the first
    /// window at `*now`).
    fn windows(limit: &Arc<AdaptiveLimit>, now: &mut Instant, delay: Duration, n: usize) {
        limit.on_sample(delay, MS, *now);
        for _ in 0..n {
            // Every slot taken (and given back) within the window.
            drop(std::iter::from_fn(|| limit.try_acquire(1, 1)).collect::<Vec<_>>());
            *now += WINDOW;
            limit.on_sample(delay, MS, *now);
        }
    }

    #[test]
    fn starts_at_max_and_admits_up_to_it() {
        let limit = adaptive(2, 4, 5);
        let permits: Vec<_> = (0..4).map(|_| limit.try_acquire(1, 1).unwrap()).collect();
        assert!(limit.try_acquire(1, 1).is_none());
        drop(permits);
        assert_eq!(limit.in_flight(), 0);
        assert!(limit.try_acquire(1, 1).is_some());
    }

    #[test]
    fn rising_queue_delay_shrinks_the_limit_down_to_min() {
        let limit = adaptive(3, 100, 5);
        let mut now = Instant::now();
        // A standing queue of 4x the target: at most halved per window (beta).
        windows(&limit, &mut now, MS * 20, 1);
        assert_eq!(limit.limit(), 50);
        windows(&limit, &mut now, MS * 20, 1);
        assert_eq!(limit.limit(), 25);
        windows(&limit, &mut now, MS * 20, 20);
        assert_eq!(limit.limit(), 3, "never below min");
    }

    #[test]
    fn decrease_is_proportional_to_the_overshoot() {
        let limit = adaptive(1, 100, 5);
        // Smallest delay 6.25 ms over a 5 ms target: x0.8.
        windows(&limit, &mut Instant::now(), Duration::from_micros(6250), 1);
        assert_eq!(limit.limit(), 80);
    }

    #[test]
    fn a_burst_that_drains_within_the_window_does_not_shrink_it() {
        let limit = adaptive(1, 100, 5);
        let t0 = Instant::now();
        let _full: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 1)).collect();
        limit.on_sample(MS * 40, MS, t0);
        // One request in the window found no queue: no standing queue.
        limit.on_sample(Duration::ZERO, MS, t0 + MS * 10);
        limit.on_sample(MS * 40, MS, t0 + WINDOW);
        assert_eq!(limit.limit(), 100);
        // The next window is judged on its own samples.
        limit.on_sample(MS * 40, MS, t0 + WINDOW * 2);
        assert_eq!(limit.limit(), 50);
    }

    #[test]
    fn falling_delay_grows_a_limit_that_is_in_use() {
        let limit = adaptive(1, 20, 5);
        let mut now = Instant::now();
        windows(&limit, &mut now, MS * 50, 10);
        assert_eq!(limit.limit(), 1);
        // Load that keeps the limit full, with short queues: +1 per window.
        for expected in 2..=20 {
            windows(&limit, &mut now, MS, 1);
            assert_eq!(limit.limit(), expected);
        }
        windows(&limit, &mut now, MS, 3);
        assert_eq!(limit.limit(), 20, "never above max");
    }

    #[test]
    fn a_limit_that_is_not_reached_does_not_move() {
        let limit = adaptive(1, 50, 5);
        let mut now = Instant::now();
        windows(&limit, &mut now, MS * 50, 3);
        assert_eq!(limit.limit(), 6);
        // One request at a time (under 80% of the limit in use): neither short queues
        // grow it nor long delays (not caused by the model's queue) shrink it.
        let _one = limit.try_acquire(1, 1).unwrap();
        for delay in [Duration::ZERO, MS * 50] {
            for _ in 0..20 {
                now += WINDOW;
                limit.on_sample(delay, MS, now);
            }
            assert_eq!(limit.limit(), 6);
        }
    }

    #[test]
    fn static_mode_never_moves() {
        let limit = Arc::new(AdaptiveLimit::new(LimitConfig {
            mode: LimitMode::Static,
            min: 1,
            max: 7,
            target: Some(MS),
        }));
        windows(&limit, &mut Instant::now(), MS * 100, 10);
        assert_eq!(limit.limit(), 7);
    }

    #[test]
    fn lower_priorities_get_a_smaller_share() {
        let limit = adaptive(1, 10, 5);
        // Two levels: level 2 may use half the limit, level 1 all of it.
        let low: Vec<_> = std::iter::from_fn(|| limit.try_acquire(2, 2)).collect();
        assert_eq!(low.len(), 5);
        let high: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 2)).collect();
        assert_eq!(high.len(), 5);
        assert!(limit.try_acquire(2, 2).is_none());
    }

    #[test]
    fn automatic_target_is_one_execution() {
        let limit = AdaptiveLimit::new(LimitConfig::default());
        assert_eq!(limit.target(), MIN_TARGET);
        limit.on_sample(Duration::ZERO, MS * 8, Instant::now());
        assert_eq!(limit.target(), MS * 8);
        // Smoothed: one fast execution moves it a tenth of the way.
        limit.on_sample(Duration::ZERO, MS * 2, Instant::now());
        assert_eq!(limit.target(), Duration::from_micros(7400));
    }
}
