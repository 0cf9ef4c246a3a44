//! Scale to zero, cold starts, growth under queue pressure, and the stuck-instance
//! watchdog.

use super::*;

const TO_ZERO: Scaling = Scaling {
    min_instances: 0,
    max_instances: 1,
    idle_timeout: Duration::from_secs(60),
    max_execution: None,
};

#[tokio::test(start_paused = true)]
async fn idle_instances_unload_down_to_zero() {
    // min_instances 0 still loads one instance at start (a broken model shows at once).
    let h = harness_with("dynamic_batching { }", 16, TO_ZERO, || Ok(())).await;
    assert_eq!(h.alive.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_secs(59)).await;
    settle().await;
    assert_eq!(
        h.alive.load(Ordering::SeqCst),
        1,
        "unloaded before the idle timeout"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    until(&h.alive, 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_at_zero_instances_loads_once_and_all_are_served() {
    let h = harness_with("dynamic_batching { }", 64, TO_ZERO, || Ok(())).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    until(&h.alive, 0).await;
    let mut answers = Vec::new();
    for _ in 0..20 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        answers.push(r);
    }
    for _ in 0..20 {
        h.permits.send(()).unwrap();
    }
    let mut served = 0;
    for r in answers {
        served += r.await.unwrap().unwrap().outputs.len();
    }
    assert_eq!(served, 20);
    assert_eq!(
        h.loads.load(Ordering::SeqCst),
        2,
        "one load at start, exactly one for the burst"
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_cold_start_respects_the_deadline() {
    // Loads after the first block until the test opens the gate.
    let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
    let open_rx = Mutex::new(open_rx);
    let first = std::sync::atomic::AtomicBool::new(true);
    let h = harness_with("dynamic_batching { }", 16, TO_ZERO, move || {
        if !first.swap(false, Ordering::SeqCst) {
            let _ = open_rx.lock().unwrap().recv();
        }
        Ok(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    until(&h.alive, 0).await;
    let deadline = Instant::now() + Duration::from_millis(100);
    let (q, r) = request(1, 2, Some(deadline));
    h.batcher.submit(q).unwrap();
    let err = r.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
    assert!(Instant::now() >= deadline && Instant::now() < deadline + Duration::from_millis(5));
    open_tx.send(()).unwrap();
    until(&h.loads, 2).await;
    // The instance that loaded late serves the next request.
    let (q, r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    h.permits.send(()).unwrap();
    r.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_cold_start_is_answered_to_every_waiter() {
    let first = std::sync::atomic::AtomicBool::new(true);
    let h = harness_with("dynamic_batching { }", 16, TO_ZERO, move || {
        if first.swap(false, Ordering::SeqCst) {
            Ok(())
        } else {
            Err("weights vanished".into())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    until(&h.alive, 0).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        answers.push(r);
    }
    for r in answers {
        match r.await.unwrap() {
            Err(Error::ModelUnavailable { reason, .. }) => {
                assert!(reason.contains("weights vanished"), "{reason}")
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    assert_eq!(h.batcher.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn queue_pressure_grows_the_pool_up_to_its_maximum() {
    let scaling = Scaling {
        min_instances: 1,
        max_instances: 3,
        idle_timeout: Duration::from_secs(60),
        max_execution: None,
    };
    let h = harness_with("dynamic_batching { }", 64, scaling, || Ok(())).await;
    let mut answers = Vec::new();
    // Each request arrives while every instance is busy: the pool grows by one.
    for n in 1..=3 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        answers.push(r);
        until(&h.alive, n).await;
        forwards(&h, n).await;
    }
    // At the maximum, more pressure only queues.
    for _ in 0..5 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        answers.push(r);
    }
    settle().await;
    for _ in 0..8 {
        h.permits.send(()).unwrap();
    }
    for r in answers {
        r.await.unwrap().unwrap();
    }
    assert_eq!(
        h.loads.load(Ordering::SeqCst),
        3,
        "never more than max_instances"
    );
    // Idle clocks start when each instance's last Done event lands (real threads, so
    // possibly after a paused-clock jump): give every instance a full idle period.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(61)).await;
        if h.batcher.instances.0.load(Ordering::Acquire) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    until(&h.alive, 1).await; // back down to the minimum
}

const WATCHED: Scaling = Scaling {
    max_execution: Some(Duration::from_secs(1)),
    ..ONE
};

#[tokio::test(start_paused = true)]
async fn an_execution_within_the_limit_is_left_alone() {
    let h = harness_with("", 16, WATCHED, || Ok(())).await;
    let (q, mut r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    forwards(&h, 1).await;
    tokio::time::advance(MS * 999).await;
    settle().await;
    assert!(
        matches!(r.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "answered before the limit"
    );
    h.permits.send(()).unwrap();
    answer(&mut r).await.unwrap();
    // The same instance takes the next request: nothing was replaced.
    let (q, mut r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    h.permits.send(()).unwrap();
    answer(&mut r).await.unwrap();
    assert_eq!(h.loads.load(Ordering::SeqCst), 1);
    assert!(!h.batcher.is_wedged());
}

#[tokio::test(start_paused = true)]
async fn an_execution_that_hangs_while_its_model_unloads_is_still_answered() {
    let h = harness_with("", 16, WATCHED, || Ok(())).await;
    let (q, mut r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    forwards(&h, 1).await;
    let Harness { batcher, .. } = h;
    drop(batcher); // the model unloads
    settle().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = answer(&mut r).await.unwrap_err();
    assert!(err.to_string().contains("instance stuck"), "{err}");
}

#[tokio::test(start_paused = true)]
// Kept whole: one scenario told in order (stuck, answered, replaced, stuck again, wedged).
async fn a_stuck_instance_is_answered_for_replaced_once_then_the_model_is_wedged() {
    let h = harness_with("", 16, WATCHED, || Ok(())).await;
    // The gate opens for nobody: the first execution hangs.
    let (q, mut r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    forwards(&h, 1).await;
    tokio::time::advance(MS * 999).await;
    settle().await;
    assert!(matches!(
        r.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
    tokio::time::advance(MS).await;
    let err = answer(&mut r).await.unwrap_err();
    assert!(
        matches!(&err, Error::ModelFailed { message, .. } if message.contains("instance stuck")),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Internal);
    // One instance, one stuck: a replacement loads and serves nothing yet.
    until(&h.loads, 2).await;
    assert!(!h.batcher.is_wedged());

    // The replacement takes the next request, and hangs on it too.
    let (q, mut r) = request(3, 2, None);
    h.batcher.submit(q).unwrap();
    assert_eq!(forwards(&h, 2).await, vec![1, 3]);
    tokio::time::advance(Duration::from_secs(1)).await;
    let err = answer(&mut r).await.unwrap_err();
    assert!(err.to_string().contains("instance stuck"), "{err}");
    // Two stuck threads for a one-instance model: no room for a third.
    settle().await;
    assert!(h.batcher.is_wedged());
    assert_eq!(h.loads.load(Ordering::SeqCst), 2);
    // New work is answered at once, not left until a deadline.
    let (q, mut r) = request(1, 2, None);
    h.batcher.submit(q).unwrap();
    match answer(&mut r).await {
        Err(Error::ModelUnavailable { reason, .. }) => {
            assert!(reason.contains("every instance is stuck"), "{reason}")
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert_eq!(
        h.seen.lock().unwrap().len(),
        2,
        "stuck instances get no work"
    );

    // Both hung executions return: their threads are retired, not put back to work.
    h.permits.send(()).unwrap();
    h.permits.send(()).unwrap();
    until(&h.alive, 0).await;
    for _ in 0..2000 {
        settle().await;
        if !h.batcher.is_wedged() {
            break;
        }
        std::thread::sleep(MS);
    }
    assert!(!h.batcher.is_wedged());
    // With room again, the next request cold-starts a fresh instance.
    let (q, mut r) = request(2, 2, None);
    h.batcher.submit(q).unwrap();
    h.permits.send(()).unwrap();
    assert_eq!(answer(&mut r).await.unwrap().batch_size, 2);
    assert_eq!(h.loads.load(Ordering::SeqCst), 3);
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 3, 2]);
}
