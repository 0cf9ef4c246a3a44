//! The limit once an overload is over: room for the bursts of the load the model keeps
//! up with, none while a queue stands over the target, and level 1 let out of a limit
//! its own stall left while lower levels still flood.

use super::tests::{adaptive, shrunk_by_a_level_2_flood, windows, MS, WINDOW};
use super::*;

/// A window of load the model keeps up with: `peak` requests in flight at once, then
/// as many served (and the one that closes the window) with a wait of `delay`.
fn calm_window(limit: &Arc<AdaptiveLimit>, now: &mut Instant, peak: usize, delay: Duration) {
    let held: Vec<_> = (0..peak)
        .map(|_| {
            limit
                .try_acquire(1, 1)
                .expect("the calm load fits the limit")
        })
        .collect();
    drop(held);
    for _ in 0..peak {
        limit.on_sample(delay, None, *now + WINDOW / 2);
    }
    *now += WINDOW;
    limit.on_sample(delay, None, *now);
}

/// A limit of 1 to 100 (target 5 ms) that three overloaded windows have shrunk, and
/// the limit they left.
fn shrunk_by_an_overload(now: &mut Instant) -> (Arc<AdaptiveLimit>, usize) {
    let limit = adaptive(1, 100, 5);
    windows(&limit, now, MS * 50, 3);
    let low = limit.limit();
    assert!((10..16).contains(&low), "{low}");
    (limit, low)
}

#[test]
fn once_the_overload_is_over_the_limit_makes_room_for_twice_its_bursts() {
    let mut now = Instant::now();
    let (limit, low) = shrunk_by_an_overload(&mut now);
    // Load the model keeps up with, at most 7 in flight: under 80% of the limit, so
    // it never grows by use. While the overload's smoothed counts still say
    // overloaded, nothing moves.
    calm_window(&limit, &mut now, 7, MS);
    assert_eq!(limit.limit(), low);
    for _ in 0..40 {
        calm_window(&limit, &mut now, 7, MS);
    }
    assert_eq!(limit.limit(), 14, "twice the most in flight lately");
    // So a burst of twice the usual load is admitted whole.
    let burst: Vec<_> = (0..14).map(|_| limit.try_acquire(1, 1)).collect();
    assert!(burst.iter().all(Option::is_some));
    drop(burst);
    // The room follows the load (that burst of 14 closes its window at 28, one of 20
    // at 40), never past max.
    calm_window(&limit, &mut now, 12, MS);
    assert_eq!(limit.limit(), 28);
    calm_window(&limit, &mut now, 20, MS);
    assert_eq!(limit.limit(), 40);
    for peak in [40, 80] {
        calm_window(&limit, &mut now, peak, MS);
    }
    assert_eq!(limit.limit(), 100);
}

#[test]
fn a_queue_over_the_target_makes_no_room_for_bursts() {
    let mut now = Instant::now();
    let (limit, low) = shrunk_by_an_overload(&mut now);
    // Three seconds without load: the overload is over.
    for _ in 0..60 {
        now += WINDOW;
        limit.on_sample(MS, None, now);
    }
    // The model keeps up and nothing is refused, but every window's wait is over the
    // target: a queue building (an overload beginning, or the model slowing down) is
    // not the time to loosen the limit.
    for _ in 0..40 {
        calm_window(&limit, &mut now, 7, MS * 6);
    }
    assert_eq!(limit.limit(), low);
}

#[test]
fn a_model_left_idle_after_an_overload_forgets_it() {
    let mut now = Instant::now();
    let (limit, low) = shrunk_by_an_overload(&mut now);
    let at = |t: Instant| limit.acquire_within(1, 1, Bound::Adaptive, t);
    // A request still in flight is no idle model (a stalled execution, say): two
    // seconds later the limit is what the overload left.
    let stalled = at(now).expect("under the limit");
    assert!(at(now + MS * 2000).is_some());
    assert_eq!(limit.limit(), low);
    drop(stalled);
    now += MS * 2000;
    limit.on_sample(MS, None, now);
    let low = limit.limit();
    assert!((10..16).contains(&low), "{low}");
    // Nothing in flight for one window's length: a pause between bursts, not idle.
    drop(at(now + MAX_WINDOW));
    assert_eq!(limit.limit(), low);
    // Two idle seconds: the limit has returned most of the way to max, so the next
    // traffic's first bursts are not refused by the overload that went before.
    let burst: Vec<_> = (0..80).map(|_| at(now + MS * 2000)).collect();
    assert!(burst.iter().all(Option::is_some));
    let expected = 100.0 - (100.0 - low as f64) * (-2.0f64).exp();
    assert!(
        (limit.limit() as f64 - expected).abs() <= 1.5,
        "{}",
        limit.limit()
    );
}

#[test]
fn level_1_held_back_with_its_wait_within_the_target_grows_the_limit_beside_a_flood() {
    let limit = adaptive(1, 100, 5);
    let mut now = Instant::now();
    shrunk_by_a_level_2_flood(&limit, &mut now);
    // A stall: level 1 asks far more than finishes, and falls behind.
    for _ in 0..40 {
        drop(limit.try_acquire(1, 2));
    }
    now += WINDOW;
    limit.on_finished(1, MS * 50, Duration::ZERO, None, now, false);
    assert!(!limit.lock().top_keeps_up);
    let mut before = limit.limit();
    // The stall is over: level 1 fills the limit and is served with a wait far under
    // the target, while level 2 keeps flooding. Its few refusals count as unserved,
    // so by its counts alone it stays behind; its wait says the limit holds it back.
    for window in 0..6 {
        let top: Vec<_> = std::iter::from_fn(|| limit.try_acquire(1, 2)).collect();
        let served = top.len();
        for _ in 0..served.div_ceil(2) {
            drop(limit.try_acquire(1, 2));
        }
        for _ in 0..40 {
            drop(limit.try_acquire(2, 2));
        }
        drop(top);
        for _ in 0..served {
            limit.on_finished(1, MS, Duration::ZERO, None, now + WINDOW / 2, true);
        }
        now += WINDOW;
        limit.on_finished(1, MS, Duration::ZERO, None, now, true);
        assert!(!limit.lock().top_keeps_up, "window {window}");
        let after = limit.limit();
        assert!(
            after as f64 >= (before as f64 * GROWTH).floor(),
            "window {window}: {before} -> {after}"
        );
        before = after;
    }
}
