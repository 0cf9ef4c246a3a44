//! Per-model concurrency limit: how many requests of one model may be in flight (queued
//! or running) at once. Over it a request is refused at once (UNAVAILABLE with pushback)
//! instead of joining a queue it would only time out in.
//!
//! In adaptive mode the limit follows the model's measured waiting time with AIMD
//! (additive increase, multiplicative decrease; Chiu & Jain, 1989), judged once per
//! window `W` on the mean wait `d` of the requests that finished in it. A request's wait
//! is what its execution's oldest request waited in the model's queue (with batching a
//! dispatch takes the whole queue, so the newest request's own wait says nothing about
//! how long work stands); a request that expired waited its whole time. Time spent
//! outside the queue (network, decoding, runtime scheduling) is left out: on a machine
//! whose cores are saturated by refusing excess traffic it grows with the refusals, and
//! a lower limit would only idle the model without removing that cost.
//!
//! A backlog also shows in the batch it swells. Without a batching delay the oldest
//! request of a batch waits about one execution divided by the instance count (an
//! instance that frees takes the whole queue), so a wait held at the target lets the
//! batches, and with them the latency, grow with whatever is in flight: under an
//! overload the bundled two-instance cnn ran batches of 15 to 25 samples whose
//! execution, not the wait before it, made its p99 several times that of normal load.
//! So each request also reports its execution's `excess`: how much longer the
//! execution took, at the model's fastest measured cost per batch size (a busy
//! machine's slowdown is no backlog, and a lower limit would not remove it), than one
//! of the samples the batching delay gathered with the batch's oldest request (those
//! that arrived within `D` of it, the batch the configuration asks for; with no
//! delay, the oldest request's own). The `held` time `h` is the wait plus that
//! excess: how long the oldest request was held up by work that was there only
//! because it stood in the queue. A window's overshoot is
//!
//! ```text
//! o = max(d / target, h / (target + A))
//! ```
//!
//! `A` (the allowance, below) once more for `h`: a backlog of `A` ahead of a request
//! runs in the batch with it, so a queue held within the target holds the request up
//! for about `A` in the queue and `A` in its batch. A model whose batching pays (the
//! bundled mlp: a batch of 32 costs a few single samples, tens of microseconds) shows
//! little excess, and is judged on its wait much as before. At the end of each window:
//!
//! ```text
//! standing, overloaded, peak > L_min:  L <- max(L_min, F, min(L, peak) * max(beta, 1 / o))
//! refused, not overloaded:             L <- min(L_max, L * g)
//! (o <= 1 or not overloaded),
//!   peak >= u * L:                     L <- min(L_max, L + sqrt(L))
//! otherwise:                           L unchanged
//! then, calm (not overloaded, nothing refused, d <= target):
//!                                      L <- max(L, min(L_max, 2 * recent_peak))
//! ```
//!
//! The model is `overloaded` when more is asked of it than it finishes: the requests
//! that asked for a slot (admitted or refused; less the growth of the number in
//! flight, not judged yet) over those served (expired ones were not, nor those whose
//! client abandoned the call before its answer), each summed over the windows with weights
//! decaying over [`LOAD_TAU`], exceed [`OVERLOAD`]. That is what true overload is (arrivals faster than service); below
//! capacity a queue, however long it stands for a while, is served at the rate it is
//! offered, and a fixed set of clients waiting for their answers can never offer more
//! than is finished. Waiting alone, which a batching delay, Poisson bursts or a closed
//! loop of many clients all make, therefore never shrinks the limit; and a limit that
//! refused while the model kept up is in the way of serveable load and grows by
//! `g = 1.5` at once (after an overload, the first bursts of normal traffic lift it
//! back). Priority level 1 is judged the same way on its own: refused while it alone is
//! served at the rate it asks, or while lower levels also asked in the window and level
//! 1's own mean wait was within the target (its refusals count as unserved, so after a
//! stall they alone would keep it judged behind), the limit grows by `g` even though
//! lower levels overload the model (preemption sheds their queued work to make the
//! room), so a flood of low-priority traffic cannot hold level 1 under a limit sized
//! for the flood. For the same reason a decrease stops at `F = peak_1 / u`, `peak_1` the most
//! level-1 requests in flight during the window, while level 1 alone is served at the
//! rate it asks (else `F = 0`): lower levels' overload shrinks the room they may take,
//! not the room level 1 used, and the `1 / u` headroom takes its next burst without
//! a refusal; and a window in which level 1 went past the limit (by displacing lower
//! levels, see Priorities below) lifts the limit to at least `F`, so that the limit
//! level 1 meets if it stops keeping up is what it used. With one level, level 1 is
//! all the traffic and `F` never applies (a decrease needs the model overloaded, and
//! one level never goes past the limit).
//!
//! The queue is `standing` when `o > 2`, or `o > 1` in this window
//! and the one before (the persistence test of CoDel, Nichols & Jacobson, 2012: a
//! burst that drains within a window is not a queue to shed for). In a window where
//! nothing was refused the queue was built by the arrivals alone, and the test is
//! stricter: more requests in flight than one round of full batches on every instance
//! takes (a shorter queue is cleared by the next dispatch), and `o > 3` or
//! over three windows in a row. Only a refusal of the highest level in
//! flight counts: a lower level refused while higher ones hold slots is precedence at
//! work, and a higher level running near capacity beside a flood of lower-level work is
//! judged like a model running alone near it.
//!
//! with `beta = 0.5` (at most halve per window), `u = 0.8` and `peak` the
//! most requests in flight during the window. `recent_peak` is the most in flight in
//! the windows that were not overloaded, as a maximum decaying over [`BURST_TAU`]: once
//! an overload is over, the limit it left (sized to hold the overload's queue near the
//! target) would refuse the bursts of ordinary Poisson traffic, which reach twice the
//! usual number in flight whenever the machine stalls an instance for a moment; the
//! limit makes room for twice what the load the model keeps up with used lately, and
//! grows no further while the load stays small (an idle model's limit does not drift
//! up). A queue over the target makes no room: an overload beginning, or a model
//! slowing down, must meet the limit it has. The decrease starts from what was in
//! flight (a limit far above the load would otherwise take many windows to matter) and
//! is proportional to the overshoot (a wait twice the target halves it); it needs more
//! than `L_min` in flight, so the fixed cost of a lone request's trip through the
//! server never reads as a queue. Only a limit that was (nearly) reached grows, so an
//! idle model's limit does not drift up. The increase of `sqrt(L)` per window (the
//! headroom Gradient2 adds, Netflix concurrency-limits) recovers from a burst's
//! decrease within a few windows instead of tens.
//!
//! `target` is judged against the model's own operating point, not a fixed latency:
//!
//! ```text
//! target = D + A,   A = configured allowance, or max(MIN_TARGET, TARGET_EXECUTIONS * u)
//! ```
//!
//! `D` is the `max_queue_delay_microseconds` of the model's `dynamic_batching`: the wait
//! the configuration itself asks of every request, so that a batch can form. Below
//! capacity the oldest request of each batch waits about `D` (the batch did not fill),
//! so a target without it reads a model serving light traffic with a 2 ms delay as a
//! standing queue and shrinks its limit to the minimum (and a 10 ms delay refuses
//! almost everything). `A` is the queueing allowed beyond that: configured, or by
//! default [`TARGET_EXECUTIONS`] times `u`, the model's fastest measured execution time
//! for one sample (a fixed yardstick per model: tied to the current batch size, or to a
//! time inflated by CPU contention, it would grow with the queue it is meant to bound),
//! at least [`MIN_TARGET`]. So what is refused is work beyond what the configuration
//! asks for and a few executions of backlog: under true overload (arrivals faster than
//! the model can serve) the queue, and with it the wait, grows without bound and soon
//! passes any such target, while below capacity it stands near `D`. `W` is ten targets,
//! within [`MIN_WINDOW`, `MAX_WINDOW`].
//!
//! Windows close only as requests finish, so a model left idle after an overload would
//! meet the next traffic with the limit the overload left, and refuse its first bursts
//! though its queue is empty. When a request arrives with nothing in flight and none
//! finished for longer than `MAX_WINDOW`, the limit first returns toward `max` by the
//! idle time `t`: `L <- max - (max - L) * exp(-t / BURST_TAU)` (after a few seconds it is
//! near `max`, where it starts: new traffic must show a standing queue of its own).
//!
//! In static mode the limit is fixed at `max`.
//!
//! Priorities: of `N` levels (1 the highest), level `p` may use the share
//! `(N - p + 1) / N` of the limit, so under pressure the lowest level is refused first.
//! When the limit is full but part of it is held by lower levels, a request is still
//! admitted as long as its own and the higher levels stay within its share; its permit
//! then [preempts](Permit::preempts): the batcher sheds the newest queued request of a
//! lower level to make room. So the highest level can always use the whole limit, and a
//! lower level's traffic never takes capacity from a higher one. Level 1 may displace
//! lower levels even beyond the whole limit (up to `max` of its own) while it alone is
//! served at the rate it asks (`top_keeps_up` of the last window): a limit sized by the
//! windows before would otherwise refuse its Poisson bursts while lower levels hold
//! room it could take, and the overload that made the limit small is theirs. Once
//! level 1 alone asks more than is finished, the limit binds it like any level.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Floor of the automatic target queue delay.
pub const MIN_TARGET: Duration = Duration::from_millis(1);
pub const MIN_WINDOW: Duration = Duration::from_millis(10);
pub const MAX_WINDOW: Duration = Duration::from_millis(200);
const BETA: f64 = 0.5;
/// While refusing: a window this many times over the target needs no second one to
/// confirm it,
const CLEAR_OVERSHOOT: u32 = 2;
/// and this many windows in a row over the target make a standing queue.
const PERSISTENCE: u32 = 2;
/// The same two while nothing was refused in the window: a queue built by the arrivals
/// alone, with the limit not in the way, must last longer before it counts.
const CLEAR_OVERSHOOT_UNREFUSED: u32 = 3;
const PERSISTENCE_UNREFUSED: u32 = 3;
const UTILIZATION: f64 = 0.8;
/// Offered over finished requests (smoothed) above which the model is overloaded,
const OVERLOAD: f64 = 1.1;
/// and the time over which they are smoothed: a window's counts weigh `exp(-t / LOAD_TAU)`
/// after `t`. Long against the stalls of a busy machine (an instance thread descheduled
/// for tens of milliseconds finishes nothing while requests keep arriving), short
/// against an overload (at twice capacity the ratio passes 1.1 within a tenth of a
/// second).
const LOAD_TAU: Duration = Duration::from_millis(500);
/// A limit that refused serveable load grows by this factor.
const GROWTH: f64 = 1.5;
/// While the model keeps up, nothing is refused and the wait is within the target, the
/// limit is at least this many times the most requests in flight lately,
const BURST_HEADROOM: f64 = 2.0;
/// "lately" being a maximum that decays by `exp(-t / BURST_TAU)`: the bursts of the last
/// second or two.
const BURST_TAU: Duration = Duration::from_secs(1);
/// Nothing in flight for longer than this (a window's longest) is idle: see
/// [`State::relax_when_idle`].
const IDLE_AFTER: Duration = MAX_WINDOW;
/// The automatic target: this many single-sample executions of queue delay. Four keep
/// the batches moderate (a batch of a few samples costs little more per sample than a
/// large one, and waits far less) while leaving room for the queue that a fixed set of
/// clients each waiting for its answer builds by itself: with two, 32 such clients on
/// `cnn` were mostly refused although every one of them was served within 40 ms.
pub const TARGET_EXECUTIONS: u32 = 4;
/// How long a client refused for being over a limit is asked to wait before retrying.
pub const LIMIT_PUSHBACK: Duration = Duration::from_millis(20);

mod state;
mod window;

use state::State;

#[cfg(test)]
mod calm_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
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
    /// Queue delay the adaptive limit allows beyond the model's batching delay; `None`:
    /// [`TARGET_EXECUTIONS`] of the model's fastest single-sample executions.
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

/// One model's limit and its in-flight count.
#[derive(Debug)]
pub struct AdaptiveLimit {
    config: LimitConfig,
    model: ModelShape,
    state: Mutex<State>,
}

/// What the model's configuration makes normal: the wait it asks for and the work its
/// instances take at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// `max_queue_delay_microseconds` when the model batches, else zero: part of every
    /// target.
    pub batching_delay: Duration,
    /// Requests that one round of full batches on every instance takes
    /// (`instances * max_batch_size`, at least 1): a queue no longer than that is
    /// cleared by the next dispatch.
    pub round: usize,
}

impl ModelShape {
    /// No batching delay, one request at a time: the target is the allowance alone.
    pub const PLAIN: ModelShape = ModelShape {
        batching_delay: Duration::ZERO,
        round: 1,
    };
}

/// Which limit a request is held to.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// The adapted limit: requests with a deadline.
    Adaptive,
    /// The configured maximum: requests without one.
    Maximum,
}

/// What [`AdaptiveLimit::decide`] says of one request (`index`: its level, from 0).
enum Decision {
    Admit { index: usize, preempts: bool },
    Refuse { index: usize },
}

/// A slot under the limit, returned when dropped.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<AdaptiveLimit>,
    level: usize,
    preempts: bool,
}

impl Permit {
    /// Admitted over the full limit by displacing lower-priority work: the request
    /// should shed a queued request of a lower level when it joins the queue.
    pub fn preempts(&self) -> bool {
        self.preempts
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.lock().by_level[self.level] -= 1;
    }
}

impl AdaptiveLimit {
    /// Starts at `max`: nothing is refused until the model has shown a standing queue.
    pub fn new(config: LimitConfig, model: ModelShape) -> AdaptiveLimit {
        let config = LimitConfig {
            min: config.min.max(1),
            max: config.max.max(config.min.max(1)),
            ..config
        };
        AdaptiveLimit {
            config,
            model: ModelShape {
                round: model.round.max(1),
                ..model
            },
            state: Mutex::new(State::new(config.max as f64)),
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
        self.lock().in_flight()
    }

    /// Take a slot for a request of `level` (1 the highest) of `levels`, or `None` when
    /// the level's share of the limit is in use.
    pub fn try_acquire(self: &Arc<Self>, level: u32, levels: u32) -> Option<Permit> {
        self.acquire_within(level, levels, Bound::Adaptive, Instant::now())
    }

    /// As [`try_acquire`](Self::try_acquire), for a request without a deadline: the
    /// adaptive limit bounds latency, which such a request has not asked to bound, so it
    /// is held only to the configured maximum (and then to its model's queue size). Its
    /// slot and its wait count toward the limit like any other.
    pub fn try_acquire_without_deadline(
        self: &Arc<Self>,
        level: u32,
        levels: u32,
    ) -> Option<Permit> {
        self.acquire_within(level, levels, Bound::Maximum, Instant::now())
    }

    /// Whether a request of `level` would be refused now, decided as
    /// [`try_acquire`](Self::try_acquire) (or, without a deadline,
    /// [`try_acquire_without_deadline`](Self::try_acquire_without_deadline)) decides,
    /// without taking a slot. A refusal counts as one (the limit's next adjustment sees
    /// it); a request it would admit is not counted here but when it takes its slot.
    pub fn refuses(&self, level: u32, levels: u32, has_deadline: bool) -> bool {
        let bound = if has_deadline {
            Bound::Adaptive
        } else {
            Bound::Maximum
        };
        let mut s = self.lock();
        s.relax_when_idle(Instant::now(), self.config.max as f64);
        match self.decide(&s, level, levels, bound) {
            Decision::Refuse { index } => {
                s.count_refusal(index);
                true
            }
            Decision::Admit { .. } => false,
        }
    }

    /// Take a slot at `now` (see [`try_acquire`](Self::try_acquire)).
    fn acquire_within(
        self: &Arc<Self>,
        level: u32,
        levels: u32,
        bound: Bound,
        now: Instant,
    ) -> Option<Permit> {
        let mut s = self.lock();
        s.relax_when_idle(now, self.config.max as f64);
        let decision = self.decide(&s, level, levels, bound);
        match decision {
            Decision::Refuse { index } => {
                s.count_refusal(index);
                None
            }
            Decision::Admit { index, preempts } => {
                s.count_offer(index);
                let in_flight = s.in_flight();
                if s.by_level.len() <= index {
                    s.by_level.resize(index + 1, 0);
                }
                s.by_level[index] += 1;
                s.window_peak = s.window_peak.max(in_flight + 1);
                if index == 0 {
                    s.window_top_peak = s.window_top_peak.max(s.by_level[0]);
                    // Past the whole limit: only by displacing lower levels.
                    s.window_top_over |= s.by_level[0] as f64 > s.limit.floor();
                }
                Some(Permit {
                    limit: self.clone(),
                    level: index,
                    preempts,
                })
            }
        }
    }

    /// A level's share of the limit: `levels - level + 1` of `levels`, at least one slot.
    /// Over its share, a request may still displace lower levels when its own level and
    /// the higher ones hold less than the share.
    fn decide(&self, s: &State, level: u32, levels: u32, bound: Bound) -> Decision {
        let levels = levels.max(1);
        let level = level.clamp(1, levels);
        let share = f64::from(levels - level + 1) / f64::from(levels);
        let limit = match bound {
            Bound::Adaptive => s.limit,
            Bound::Maximum => self.config.max as f64,
        };
        let allowed = (limit * share).floor().max(1.0) as usize;
        let index = level as usize - 1;
        let in_flight = s.in_flight();
        // This level and the higher ones.
        let own: usize = s.by_level.iter().take(index + 1).sum();
        if in_flight < allowed {
            Decision::Admit {
                index,
                preempts: false,
            }
        } else if in_flight > own && (own < allowed || self.top_displaces(s, index, own)) {
            Decision::Admit {
                index,
                preempts: true,
            }
        } else {
            Decision::Refuse { index }
        }
    }

    /// Whether a request of level `index` (from 0), over its share with `own` of its
    /// level and the higher ones in flight, may still displace lower levels: level 1
    /// while it alone is served at the rate it asks, up to the configured maximum. Its
    /// bursts are then no overload of its own, and what the limit holds back is the
    /// lower levels' work, which makes the room.
    fn top_displaces(&self, s: &State, index: usize, own: usize) -> bool {
        index == 0 && s.top_keeps_up && own < self.config.max
    }

    /// The queue delay target now in force.
    pub fn target(&self) -> Duration {
        let s = self.lock();
        self.target_of(&s)
    }

    fn target_of(&self, s: &State) -> Duration {
        self.model
            .batching_delay
            .saturating_add(self.allowance_of(s))
    }

    /// The target's `A`: the queueing allowed beyond the batching delay.
    fn allowance_of(&self, s: &State) -> Duration {
        self.config.target.unwrap_or_else(|| {
            s.unit
                .map_or(MIN_TARGET, |u| (u * TARGET_EXECUTIONS).max(MIN_TARGET))
        })
    }

    /// Feed one request that was served: how long its execution's oldest request waited
    /// in the queue, and the model's current execution time for one sample when known.
    /// Returns the limit when this sample closed a window (the only time it can
    /// change), `None` otherwise.
    pub fn on_sample(
        &self,
        queue_delay: Duration,
        unit: Option<Duration>,
        now: Instant,
    ) -> Option<usize> {
        self.on_finished(1, queue_delay, Duration::ZERO, unit, now, true)
    }

    /// A request of priority `level` left: served (answered), or expired before its
    /// answer (`queue_delay`: its whole wait; it was not served, and an overload that
    /// lets requests expire in the queue instead of refusing them is still an
    /// overload). `excess`: the part of its execution spent on work beyond the batch
    /// its model's configuration asked for (zero for one that was not executed).
    /// [`on_sample`](Self::on_sample) is a served request of level 1 without excess.
    pub fn on_finished(
        &self,
        level: u32,
        queue_delay: Duration,
        excess: Duration,
        unit: Option<Duration>,
        now: Instant,
        served: bool,
    ) -> Option<usize> {
        let mut s = self.lock();
        // The fastest seen: contention only ever slows an execution down, and a
        // yardstick that rose with the load would loosen the limit as it tightens.
        s.unit = match (s.unit, unit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.config.mode == LimitMode::Static {
            return None;
        }
        s.last_finished = Some(now);
        s.window_sum += queue_delay;
        s.window_held_sum += queue_delay.saturating_add(excess);
        s.window_count += 1;
        s.window_served += u32::from(served);
        if level <= 1 {
            s.window_top_sum += queue_delay;
            s.window_top_count += 1;
            s.window_top_served += u32::from(served);
        }
        let target = self.target_of(&s);
        let window = (target * 10).clamp(MIN_WINDOW, MAX_WINDOW);
        let start = *s.window_start.get_or_insert(now);
        if now.duration_since(start) < window {
            return None;
        }
        self.close_window(&mut s, start, now, target);
        Some(s.limit as usize)
    }
}
