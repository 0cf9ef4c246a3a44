//! The limit's rules, one window at a time, on a paused clock.

use super::*;

pub(super) const MS: Duration = Duration::from_millis(1);

pub(super) fn adaptive(min: usize, max: usize, target_ms: u64) -> Arc<AdaptiveLimit> {
    Arc::new(AdaptiveLimit::new(
        LimitConfig {
            mode: LimitMode::Adaptive,
            min,
            max,
            target: Some(MS * target_ms as u32),
        },
        ModelShape::PLAIN,
    ))
}

/// `n` more requests ask for a slot, one after another, and leave unserved (refused,
/// or admitted and gone without an answer): more is asked of the model than it
/// serves, which is what makes a standing queue an overload.
fn unserved(limit: &Arc<AdaptiveLimit>, n: usize) {
    for _ in 0..n {
        drop(limit.try_acquire(1, 1));
    }
}

/// The window for a 5 ms target is 50 ms.
pub(super) const WINDOW: Duration = Duration::from_millis(50);

/// Close `n` windows in which the limit is reached (every slot taken), each with one
/// sample of `delay` at its end (the first call on a fresh limit opens the first
/// window at `*now`).
pub(super) fn windows(limit: &Arc<AdaptiveLimit>, now: &mut Instant, delay: Duration, n: usize) {
    limit.on_sample(delay, None, *now);
    for _ in 0..n {
        // Every slot taken (and given back) within the window.
        drop(std::iter::from_fn(|| limit.try_acquire(1, 1)).collect::<Vec<_>>());
        *now += WINDOW;
        limit.on_sample(delay, None, *now);
    }
}

/// As [`windows`], but as many requests finish in each window as asked for a slot (the
/// refused one included, the last of them closing the window): the model keeps up.
fn served_windows(limit: &Arc<AdaptiveLimit>, now: &mut Instant, delay: Duration, n: usize) {
    limit.on_sample(delay, None, *now);
    for _ in 0..n {
        drop(std::iter::from_fn(|| limit.try_acquire(1, 1)).collect::<Vec<_>>());
        for _ in 0..limit.limit() {
            limit.on_sample(delay, None, *now + WINDOW / 2);
        }
        *now += WINDOW;
        limit.on_sample(delay, None, *now);
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
    // Delay 6.25 ms over a 5 ms target, standing for two windows: x0.8.
    windows(&limit, &mut Instant::now(), Duration::from_micros(6250), 2);
    assert_eq!(limit.limit(), 80);
}

#[test]
fn a_burst_that_drains_within_a_window_shrinks_nothing() {
    let limit = adaptive(1, 100, 5);
    let mut now = Instant::now();
    // Windows 1.8x over the target, each followed by one under it.
    for _ in 0..5 {
        windows(&limit, &mut now, MS * 9, 1);
        assert_eq!(limit.limit(), 100, "one window over is a burst");
        windows(&limit, &mut now, MS, 1);
    }
    // Two in a row is a standing queue.
    windows(&limit, &mut now, MS * 9, 2);
    assert_eq!(limit.limit(), 55);
}

#[test]
fn each_window_is_judged_on_its_own_mean_wait() {
    let limit = adaptive(1, 100, 5);
    let t0 = Instant::now();
    // Every slot taken and one request refused.
    let _full: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 1)).collect();
    // Mean 4 ms (one long wait among short ones): within the 5 ms target.
    limit.on_sample(MS * 10, None, t0);
    limit.on_sample(MS, None, t0 + MS * 10);
    limit.on_sample(MS, None, t0 + WINDOW);
    assert_eq!(limit.limit(), 100);
    // The next two windows (refusing): mean 8 ms, a standing queue once confirmed,
    // so x 5/8.
    unserved(&limit, 20);
    limit.on_sample(MS * 6, None, t0 + WINDOW + MS);
    limit.on_sample(MS * 10, None, t0 + WINDOW * 2);
    assert_eq!(limit.limit(), 100);
    unserved(&limit, 20);
    limit.on_sample(MS * 6, None, t0 + WINDOW * 2 + MS);
    limit.on_sample(MS * 10, None, t0 + WINDOW * 3);
    assert_eq!(limit.limit(), 62);
}

#[test]
fn falling_delay_grows_a_limit_that_is_in_use() {
    let limit = adaptive(1, 20, 5);
    let mut now = Instant::now();
    windows(&limit, &mut now, MS * 50, 10);
    assert_eq!(limit.limit(), 1);
    // Load that keeps the limit full, with short waits: + sqrt(L) per window.
    let mut expected = 1.0_f64;
    while expected < 20.0 {
        expected = (expected + expected.sqrt().max(1.0)).min(20.0);
        windows(&limit, &mut now, MS, 1);
        assert_eq!(limit.limit(), expected as usize);
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
            limit.on_sample(delay, None, now);
        }
        assert_eq!(limit.limit(), 6);
    }
}

#[test]
fn requests_without_a_deadline_are_held_only_to_the_maximum() {
    let limit = adaptive(2, 8, 5);
    let mut now = Instant::now();
    // A standing queue brings the limit down to its minimum.
    windows(&limit, &mut now, MS * 40, 8);
    assert_eq!(limit.limit(), 2);
    let with_deadline: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 1)).collect();
    assert_eq!(
        with_deadline.len(),
        2,
        "deadline-bound requests meet the adapted limit"
    );
    let without: Vec<_> = std::iter::from_fn(|| limit.try_acquire_without_deadline(1, 1)).collect();
    assert_eq!(
        without.len(),
        6,
        "requests without a deadline fill up to the maximum of 8, counting the others"
    );
    assert!(limit.try_acquire(1, 1).is_none());
    assert_eq!(limit.in_flight(), 8);
}

#[test]
fn static_mode_never_moves() {
    let limit = Arc::new(AdaptiveLimit::new(
        LimitConfig {
            mode: LimitMode::Static,
            min: 1,
            max: 7,
            target: Some(MS),
        },
        ModelShape::PLAIN,
    ));
    windows(&limit, &mut Instant::now(), MS * 100, 10);
    assert_eq!(limit.limit(), 7);
}

#[test]
fn lower_priorities_get_a_smaller_share() {
    let limit = adaptive(1, 10, 5);
    // Two levels: level 2 may use half the limit, level 1 all of it.
    let low: Vec<_> = std::iter::from_fn(|| limit.try_acquire(2, 2)).collect();
    assert_eq!(low.len(), 5);
    assert!(low.iter().all(|p| !p.preempts()));
    let high: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 2)).collect();
    // The first five fit under the limit; five more displace the lower level.
    assert_eq!(high.len(), 10);
    assert_eq!(high.iter().filter(|p| p.preempts()).count(), 5);
    assert!(high[..5].iter().all(|p| !p.preempts()));
    assert!(limit.try_acquire(2, 2).is_none());
    assert!(
        limit.try_acquire(1, 2).is_none(),
        "level 1 alone fills the limit"
    );
    // As the displaced requests leave, the higher level holds the whole limit.
    drop(low);
    assert_eq!(limit.in_flight(), 10);
    assert!(limit.try_acquire(1, 2).is_none());
    drop(high);
    assert_eq!(limit.in_flight(), 0);
}

#[test]
fn a_level_preempts_only_lower_levels_and_only_up_to_its_share() {
    let limit = adaptive(1, 10, 5);
    // Three levels: shares 10, 6 and 3 of a limit of 10.
    let third: Vec<_> = std::iter::from_fn(|| limit.try_acquire(3, 3)).collect();
    assert_eq!(third.len(), 3);
    assert!(
        third.iter().all(|p| !p.preempts()),
        "the lowest level never preempts"
    );
    let second: Vec<_> = std::iter::from_fn(|| limit.try_acquire(2, 3)).collect();
    assert_eq!(
        second.len(),
        6,
        "its share, three of them displacing level 3"
    );
    assert_eq!(second.iter().filter(|p| p.preempts()).count(), 3);
    let first: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 3)).collect();
    assert_eq!(first.len(), 10);
    assert_eq!(first.iter().filter(|p| p.preempts()).count(), 9);
}

#[test]
fn automatic_target_is_a_few_single_sample_executions() {
    let limit = AdaptiveLimit::new(LimitConfig::default(), ModelShape::PLAIN);
    assert_eq!(limit.target(), MIN_TARGET);
    limit.on_sample(Duration::ZERO, Some(MS * 3), Instant::now());
    assert_eq!(limit.target(), MS * 3 * TARGET_EXECUTIONS);
    // A fast model keeps the floor.
    limit.on_sample(
        Duration::ZERO,
        Some(Duration::from_micros(30)),
        Instant::now(),
    );
    assert_eq!(limit.target(), MIN_TARGET);
    // No news keeps the last value.
    limit.on_sample(Duration::ZERO, None, Instant::now());
    assert_eq!(limit.target(), MIN_TARGET);
}

#[test]
fn a_limit_far_above_the_load_drops_to_what_was_in_flight() {
    let limit = adaptive(2, 256, 5);
    let t0 = Instant::now();
    let held: Vec<_> = (0..40).map(|_| limit.try_acquire(1, 1).unwrap()).collect();
    limit.on_sample(MS * 16, None, t0);
    unserved(&limit, 20);
    limit.on_sample(MS * 16, None, t0 + WINDOW);
    // 40 (at most 41) in flight, nothing refused, a queue of over three times the
    // target (no further window needed): 41 * 0.5.
    assert_eq!(limit.limit(), 20);
    drop(held);
}

#[test]
fn without_refusals_a_queue_must_last_longer_before_it_counts() {
    /// What is refused in each window.
    #[derive(Clone, Copy, Debug)]
    enum Refusing {
        Nothing,
        /// Level 1 of 1 with every slot taken: the limit binds.
        TopLevel,
        /// Level 2 of 2 while level 1 holds half the limit: precedence, not load.
        LowerLevel,
    }
    for (refusing, held, after, to) in [
        (Refusing::Nothing, 50, 3, 25),
        (Refusing::TopLevel, 100, 1, 50),
        (Refusing::LowerLevel, 50, 3, 25),
    ] {
        let limit = adaptive(1, 100, 5);
        let t0 = Instant::now();
        let _held: Vec<_> = (0..held)
            .map(|_| limit.try_acquire(1, 1).unwrap())
            .collect();
        // A mean wait 2.4x the target in every window.
        limit.on_sample(MS * 12, None, t0);
        let mut shrunk_after = None;
        for w in 1..=3 {
            unserved(&limit, 20);
            match refusing {
                Refusing::Nothing => {}
                Refusing::TopLevel => assert!(limit.try_acquire(1, 1).is_none()),
                Refusing::LowerLevel => assert!(limit.try_acquire(2, 2).is_none()),
            }
            limit.on_sample(MS * 12, None, t0 + WINDOW * w);
            if limit.limit() < 100 {
                shrunk_after = Some(w);
                break;
            }
        }
        // Refused at the top: over twice the target is enough at once. Otherwise
        // three windows in a row. Either way from what was in flight,
        // x max(0.5, 5/12).
        assert_eq!(shrunk_after, Some(after), "{refusing:?}");
        assert_eq!(limit.limit(), to, "{refusing:?}");
    }
}

#[test]
fn the_target_adds_the_models_batching_delay() {
    let shape = ModelShape {
        batching_delay: MS * 10,
        round: 32,
    };
    let limit = AdaptiveLimit::new(LimitConfig::default(), shape);
    assert_eq!(limit.target(), MS * 10 + MIN_TARGET);
    limit.on_sample(Duration::ZERO, Some(MS * 3), Instant::now());
    assert_eq!(limit.target(), MS * 10 + MS * 3 * TARGET_EXECUTIONS);
}

#[test]
fn long_waits_of_load_the_model_keeps_up_with_shrink_nothing() {
    // As many requests ask as finish (a closed loop, or arrivals below capacity),
    // every slot in use and refusing, with waits far over the target.
    let limit = adaptive(1, 16, 5);
    served_windows(&limit, &mut Instant::now(), MS * 50, 20);
    assert_eq!(limit.limit(), 16);
}

#[test]
fn a_limit_that_refuses_load_the_model_keeps_up_with_grows_at_once() {
    let limit = adaptive(1, 100, 5);
    let mut now = Instant::now();
    // Overload brings it down.
    windows(&limit, &mut now, MS * 50, 6);
    let low = limit.limit();
    assert!(low < 10, "{low}");
    // Then the load falls to what the model finishes, in bursts that meet the
    // limit: half as much again per window, not the square root.
    for _ in 0..5 {
        for _ in 0..40 {
            limit.on_sample(MS * 6, None, now);
        }
        drop(std::iter::from_fn(|| limit.try_acquire(1, 1)).collect::<Vec<_>>());
        now += WINDOW;
        limit.on_sample(MS * 6, None, now);
    }
    assert!(
        limit.limit() >= (low as f64 * 1.5_f64.powi(4)) as usize,
        "{}",
        limit.limit()
    );
}

#[test]
fn a_lone_request_never_shrinks_the_limit() {
    let limit = adaptive(2, 64, 5);
    let mut now = Instant::now();
    for _ in 0..20 {
        let _one = limit.try_acquire(1, 1).unwrap();
        limit.on_sample(MS * 30, None, now);
        now += WINDOW;
    }
    assert_eq!(limit.limit(), 64);
}

#[test]
fn refuses_decides_as_try_acquire_without_taking_a_slot() {
    let limit = adaptive(1, 10, 5);
    // Three levels filled lowest first, as in the preemption test: at every step,
    // `refuses` agrees with an acquire made in the same state, and takes nothing.
    let mut held = Vec::new();
    for level in [3, 2, 1] {
        loop {
            for asked in 1..=3 {
                let in_flight = limit.in_flight();
                let refused = limit.refuses(asked, 3, true);
                assert_eq!(limit.in_flight(), in_flight, "no slot taken");
                let acquired = limit.try_acquire(asked, 3);
                assert_eq!(refused, acquired.is_none(), "level {asked} at {in_flight}");
            }
            match limit.try_acquire(level, 3) {
                Some(permit) => held.push(permit),
                None => break,
            }
        }
    }
    // Shares 3, 6 and 10, the higher levels admitted over the lower ones.
    assert_eq!(limit.in_flight(), 3 + 6 + 10);
}

#[test]
fn a_refusal_judged_early_counts_like_one_at_acquire() {
    let limit = adaptive(1, 2, 5);
    assert!(!limit.refuses(1, 1, true));
    assert_eq!(
        limit.lock().window_offered,
        0,
        "an admission is counted when its slot is taken"
    );
    let held: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 1)).collect();
    let offered = limit.lock().window_offered;
    assert!(limit.refuses(1, 1, true));
    assert!(
        limit.refuses(1, 1, false),
        "the maximum binds without a deadline"
    );
    let s = limit.lock();
    assert_eq!(s.window_offered, offered + 2);
    assert!(s.window_refused && s.window_top_refused);
    drop(s);
    drop(held);
    assert!(!limit.refuses(1, 1, true));
}

#[test]
fn a_lower_levels_flood_does_not_shrink_the_limit_under_what_level_1_uses() {
    let limit = adaptive(1, 100, 5);
    let mut now = Instant::now();
    limit.on_finished(1, MS, Duration::ZERO, None, now, true);
    for window in 0..10 {
        // Level 1 holds 20 slots and is served as fast as it asks; level 2 takes its
        // share and asks for far more, and what it got expires after long waits.
        let top: Vec<_> = (0..20)
            .map(|i| {
                limit
                    .try_acquire(1, 2)
                    .unwrap_or_else(|| panic!("window {window}: level 1's request {i} refused"))
            })
            .collect();
        for _ in 0..40 {
            drop(limit.try_acquire(2, 2));
        }
        drop(top);
        for _ in 0..20 {
            limit.on_finished(1, MS, Duration::ZERO, None, now, true);
        }
        for _ in 0..40 {
            limit.on_finished(2, MS * 50, Duration::ZERO, None, now, false);
        }
        now += WINDOW;
        limit.on_finished(1, MS, Duration::ZERO, None, now, true);
    }
    // The overload shrank the limit, but not below level 1's peak with 1/u headroom.
    assert_eq!(limit.limit(), 25);
}

#[test]
fn level_1_displaces_lower_levels_beyond_the_limit_while_it_keeps_up() {
    let limit = adaptive(1, 100, 5);
    let mut now = Instant::now();
    let small = shrunk_by_a_level_2_flood(&limit, &mut now);
    // Level 2 holds its share; a burst of level 1 three times the limit is admitted,
    // every request displacing lower-level work, while no lower level would be.
    let low: Vec<_> = std::iter::from_fn(|| limit.try_acquire(2, 2)).collect();
    assert!(!low.is_empty());
    let burst: Vec<_> = (0..3 * small)
        .map(|i| {
            let full = limit.in_flight() >= small;
            let permit = limit
                .try_acquire(1, 2)
                .unwrap_or_else(|| panic!("level 1's request {i} refused at limit {small}"));
            assert_eq!(
                permit.preempts(),
                full,
                "request {i}: over the limit, it displaces"
            );
            permit
        })
        .collect();
    assert!(limit.try_acquire(2, 2).is_none());
    // The window closes with level 1 still keeping up: the limit it would be held to
    // if it stopped is what it used, with the 1/u headroom.
    now += WINDOW;
    limit.on_finished(1, MS, Duration::ZERO, None, now, true);
    let lifted = limit.limit();
    assert_eq!(lifted, (3 * small) * 5 / 4, "lifted from {small}");
    // Level 1 alone now asks far more than is finished: the limit binds it again.
    for _ in 0..4 {
        for _ in 0..100 {
            drop(limit.try_acquire(1, 2));
        }
        now += WINDOW;
        limit.on_finished(1, MS * 50, Duration::ZERO, None, now, false);
    }
    assert!(!limit.lock().top_keeps_up);
    assert!(limit.limit() <= lifted, "{}", limit.limit());
    assert!(
        limit.try_acquire(1, 2).is_none(),
        "level 1's own overload is refused"
    );
    drop((burst, low));
}

/// A level-2 flood, refused and expiring, shrinks the limit while level 1 (two requests
/// a window, all served) keeps up; returns the limit it leaves.
pub(super) fn shrunk_by_a_level_2_flood(limit: &Arc<AdaptiveLimit>, now: &mut Instant) -> usize {
    limit.on_finished(1, MS, Duration::ZERO, None, *now, true);
    for _ in 0..8 {
        let top: Vec<_> = (0..2).map(|_| limit.try_acquire(1, 2).unwrap()).collect();
        let low: Vec<_> = std::iter::from_fn(|| limit.try_acquire(2, 2)).collect();
        for _ in 0..40 {
            drop(limit.try_acquire(2, 2));
        }
        drop((top, low));
        limit.on_finished(1, MS, Duration::ZERO, None, *now, true);
        for _ in 0..40 {
            limit.on_finished(2, MS * 50, Duration::ZERO, None, *now, false);
        }
        *now += WINDOW;
        limit.on_finished(1, MS, Duration::ZERO, None, *now, true);
    }
    let small = limit.limit();
    assert!(small < 10, "{small}");
    small
}

#[test]
fn a_queue_over_the_target_before_the_overload_counts_toward_persistence() {
    let limit = adaptive(1, 16, 5);
    let mut now = Instant::now();
    // Two windows 1.6x over the target, every slot in use, all of it served: no
    // overload, nothing shrinks, but the queue has stood for two windows.
    served_windows(&limit, &mut now, MS * 8, 2);
    assert_eq!(limit.limit(), 16);
    // The first overloaded window with the same wait shrinks at once (x 5/8).
    let held: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 1)).collect();
    unserved(&limit, 200);
    drop(held);
    now += WINDOW;
    limit.on_sample(MS * 8, None, now);
    assert_eq!(limit.limit(), 10);
}
