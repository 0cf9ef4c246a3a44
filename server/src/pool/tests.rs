//! The pool's bookkeeping: stuck executions, the cap on new instances, answering once.

use super::*;

const MS: Duration = Duration::from_millis(1);

#[test]
fn watch_finds_executions_at_or_past_the_limit_and_the_next_expiry() {
    let t0 = tokio::time::Instant::now();
    let busy = [(0, t0), (1, t0 + MS * 50), (2, t0 + MS * 80)];
    // Nothing has run 100 ms yet: the first to get there is instance 0, at t0 + 100.
    assert_eq!(
        watch(busy, MS * 100, t0 + MS * 99),
        Watch {
            overdue: vec![],
            next: Some(t0 + MS * 100)
        }
    );
    // Exactly at the limit it is overdue; the next is instance 1's.
    assert_eq!(
        watch(busy, MS * 100, t0 + MS * 100),
        Watch {
            overdue: vec![0],
            next: Some(t0 + MS * 150)
        }
    );
    assert_eq!(
        watch(busy, MS * 100, t0 + MS * 200),
        Watch {
            overdue: vec![0, 1, 2],
            next: None
        }
    );
    // No busy instance: nothing found, no timer to arm.
    assert_eq!(
        watch([], MS * 100, t0),
        Watch {
            overdue: vec![],
            next: None
        }
    );
    // A limit that overflows the clock is never reached (and does not panic).
    assert_eq!(
        watch(busy, Duration::MAX, t0 + MS * 200),
        Watch {
            overdue: vec![],
            next: None
        }
    );
}

#[test]
fn stuck_threads_count_toward_the_cap_on_new_instances() {
    // One instance: one replacement for a stuck one, none once that one is stuck too.
    assert!(room_for_instance(0, 0, 1));
    assert!(
        !room_for_instance(1, 0, 1),
        "never more than the count in service"
    );
    assert!(room_for_instance(0, 1, 1));
    assert!(!room_for_instance(0, 2, 1));
    assert!(!room_for_instance(1, 1, 1));
    // Two instances: at most four threads in all.
    assert!(room_for_instance(1, 2, 2));
    assert!(!room_for_instance(1, 3, 2));
    assert!(!room_for_instance(0, 4, 2));
    assert!(room_for_instance(0, 3, 2));
    // Saturating, not wrapping, at the extremes.
    assert!(!room_for_instance(usize::MAX, usize::MAX, usize::MAX));
    assert!(!room_for_instance(0, 0, 0));
}

#[test]
fn a_reply_is_sent_once_by_whoever_answers_first() {
    let (tx, mut rx) = oneshot::channel();
    let reply = Reply::new(tx);
    let watchdog = reply.clone();
    assert!(!reply.is_closed());
    assert!(watchdog.send(Err(Error::ModelFailed {
        model: "m".into(),
        message: "instance stuck".into(),
    })));
    // The instance comes back later: its answer goes nowhere.
    assert!(reply.is_closed());
    assert!(!reply.send(Err(Error::ShuttingDown)));
    match rx.try_recv() {
        Ok(Err(Error::ModelFailed { message, .. })) => assert_eq!(message, "instance stuck"),
        other => panic!("expected the watchdog's answer, got {other:?}"),
    }
    // A client that has gone closes the reply too.
    let (tx, rx) = oneshot::channel::<Result<Done, Error>>();
    let reply = Reply::new(tx);
    drop(rx);
    assert!(reply.is_closed());
    assert!(!reply.send(Err(Error::ShuttingDown)));
}
