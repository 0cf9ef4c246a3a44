//! Priorities, the predicted wait at submit, and the dispatch-time deadline check.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_higher_priority_is_dispatched_first_and_each_level_in_arrival_order() {
    // No dynamic batching: one request per execution, so the executions the backend
    // sees (by their sample counts) are the dispatch order.
    let h = harness("", 16).await;
    let (busy, rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    let (low, rlow) = at_priority(request(2, 2, None), 2);
    let (high_a, rhigh_a) = at_priority(request(3, 2, None), 1);
    let (high_b, rhigh_b) = at_priority(request(4, 2, None), 1);
    for q in [low, high_a, high_b] {
        h.batcher.submit(q).unwrap();
    }
    settle().await;
    run_and_answer(&h, 4, [rbusy, rlow, rhigh_a, rhigh_b]).await;
    assert_eq!(
        *h.seen.lock().unwrap(),
        vec![1, 3, 4, 2],
        "level 1 before level 2, each level oldest first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_preempting_request_sheds_the_newest_lower_level_request_at_once() {
    let h = harness("", 16).await;
    let (busy, rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    let preempting = |(q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>)| {
        (Queued { preempt: true, ..q }, rx)
    };
    // Nothing of a lower level is queued: nothing is shed.
    let (first, rfirst) = preempting(at_priority(request(5, 2, None), 1));
    h.batcher.submit(first).unwrap();
    settle().await;
    assert_eq!(h.batcher.depth(), 1);
    let (low_old, rlow_old) = at_priority(request(2, 2, None), 2);
    let (low_new, mut rlow_new) = at_priority(request(3, 2, None), 2);
    let (high, rhigh) = preempting(at_priority(request(4, 2, None), 1));
    for q in [low_old, low_new, high] {
        h.batcher.submit(q).unwrap();
    }
    settle().await;
    // Answered before any instance frees up.
    match rlow_new.try_recv() {
        Ok(Err(Error::Overloaded { reason, .. })) => {
            assert!(reason.contains("priority level 1"), "{reason}")
        }
        other => panic!("the newest level-2 request should be shed, got {other:?}"),
    }
    assert_eq!(h.batcher.depth(), 3);
    run_and_answer(&h, 4, [rbusy, rfirst, rhigh, rlow_old]).await;
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 5, 4, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_filled_from_the_highest_priority_first() {
    let h = harness("dynamic_batching { }", 16).await;
    let (busy, rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    // In arrival order the 6 would go first (4 does not fit beside it); by priority
    // the two 4s fill a batch of 8 and the 6 waits for the next one.
    let (low, rlow) = at_priority(request(6, 2, None), 2);
    let (high_a, rhigh_a) = at_priority(request(4, 2, None), 1);
    let (high_b, rhigh_b) = at_priority(request(4, 2, None), 1);
    for q in [low, high_a, high_b] {
        h.batcher.submit(q).unwrap();
    }
    settle().await;
    for _ in 0..3 {
        h.permits.send(()).unwrap();
    }
    rbusy.await.unwrap().unwrap();
    assert_eq!(rhigh_a.await.unwrap().unwrap().batch_size, 8);
    assert_eq!(rhigh_b.await.unwrap().unwrap().batch_size, 8);
    assert_eq!(rlow.await.unwrap().unwrap().batch_size, 6);
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 8, 6]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_carries_one_priority_level() {
    let h = harness("dynamic_batching { }", 16).await;
    let (busy, rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    // 4 + 2 would fit in one batch of 16, but the level-2 request would lengthen the
    // level-1 execution: each level runs on its own, the higher one first.
    let (low, rlow) = at_priority(request(2, 2, None), 2);
    let (high, rhigh) = at_priority(request(4, 2, None), 1);
    for q in [low, high] {
        h.batcher.submit(q).unwrap();
    }
    settle().await;
    for _ in 0..3 {
        h.permits.send(()).unwrap();
    }
    rbusy.await.unwrap().unwrap();
    assert_eq!(rhigh.await.unwrap().unwrap().batch_size, 4);
    assert_eq!(rlow.await.unwrap().unwrap().batch_size, 2);
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 4, 2]);
}

#[tokio::test(start_paused = true)]
async fn while_a_higher_level_is_active_a_lower_level_runs_in_small_batches() {
    let h = harness("dynamic_batching { }", 16).await;
    // Level 1 keeps an instance busy while six single-sample level-2 requests queue.
    let (busy, rbusy) = at_priority(request(1, 2, None), 1);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    let submit_low = |n: usize| {
        (0..n)
            .map(|_| {
                let (q, r) = at_priority(request(1, 2, None), 2);
                h.batcher.submit(q).unwrap();
                r
            })
            .collect::<Vec<_>>()
    };
    let low = submit_low(6);
    settle().await;
    run_and_answer(&h, 3, std::iter::once(rbusy).chain(low)).await;
    // Batches that run within four single-sample executions (four samples, the fake
    // model's cost being per sample as far as the estimate knows), not one of six.
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 4, 2]);

    // Once level 1 has been quiet for a while, level 2 gets whole batches again.
    tokio::time::advance(Duration::from_secs(2)).await;
    let (busy, rbusy) = at_priority(request(1, 2, None), 2);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 4).await, vec![1, 4, 2, 1]);
    let low = submit_low(6);
    settle().await;
    run_and_answer(&h, 2, std::iter::once(rbusy).chain(low)).await;
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 4, 2, 1, 6]);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_nearer_than_the_measured_wait_is_refused_at_submit() {
    let h = harness("dynamic_batching { }", 16).await;
    // Before any execution nothing is predicted: a near deadline is not refused.
    assert_eq!(h.batcher.estimate.estimate(1), None);
    // One execution, held by the gate for at least 20 ms of real time.
    let (q, mut r) = with_deadline(request(1, 2, None), Instant::now() + MS);
    h.batcher.submit(q).unwrap();
    forwards(&h, 1).await;
    std::thread::sleep(MS * 20);
    h.permits.send(()).unwrap();
    let done = answer(&mut r).await.unwrap();
    assert!(done.compute >= MS * 20, "{:?}", done.compute);
    // The pool recorded what it measured.
    let measured = done.compute;
    assert_eq!(h.batcher.estimate.estimate(1), Some(measured));

    // A deadline nearer than one execution: refused at once, never queued.
    let now = Instant::now();
    let (near, mut rnear) = with_deadline(request(1, 2, None), now + measured / 2);
    let err = h.batcher.submit(near).unwrap_err();
    let (reason, retry_after) = crate::error::expect_overloaded(err);
    assert!(reason.contains("predicted wait"), "{reason}");
    assert_eq!(retry_after, measured, "pushback is the predicted wait");
    assert!(rnear.try_recv().is_err(), "the request was handed back");
    assert_eq!(h.batcher.depth(), 0);

    // A far deadline: accepted and served.
    let (far, mut rfar) = with_deadline(request(1, 2, None), now + Duration::from_secs(10));
    h.batcher.submit(far).unwrap();
    h.permits.send(()).unwrap();
    answer(&mut rfar).await.unwrap();
    assert_eq!(
        *h.seen.lock().unwrap(),
        vec![1, 1],
        "the refused one never ran"
    );
}

#[tokio::test(start_paused = true)]
async fn the_predicted_wait_counts_only_what_goes_first() {
    let h = harness("dynamic_batching { }", 16).await;
    h.batcher.estimate.record(8, MS * 80);
    h.batcher.estimate.record(1, MS * 10);
    let (busy, _rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    forwards(&h, 1).await;
    // Two full batches of level 2 wait.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (q, r) = at_priority(request(8, 2, None), 2);
        h.batcher.submit(q).unwrap();
        waiting.push(r);
    }
    let deadline = Instant::now() + MS * 100;
    // Another level-2 request would wait for both (3 rounds of 80 ms).
    let (low, _rlow) = with_deadline(at_priority(request(1, 2, None), 2), deadline);
    let err = h.batcher.submit(low).unwrap_err();
    assert_eq!(crate::error::expect_overloaded(err).1, MS * 240);
    // A level-1 request goes before them: only its own execution counts.
    let (high, mut rhigh) = with_deadline(at_priority(request(1, 2, None), 1), deadline);
    h.batcher.submit(high).unwrap();
    assert_eq!(h.batcher.depth(), 3);
    settle().await;
    for _ in 0..4 {
        h.permits.send(()).unwrap();
    }
    assert_eq!(answer(&mut rhigh).await.unwrap().batch_size, 1);
    for mut r in waiting {
        answer(&mut r).await.unwrap();
    }
    assert_eq!(*h.seen.lock().unwrap(), vec![1, 1, 8, 8]);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_finish_before_its_deadline_is_not_dispatched() {
    let h = harness("dynamic_batching { }", 16).await;
    // One sample takes 100 ms (the busy request below has 2 samples, so its own
    // execution does not change this figure).
    h.batcher.estimate.record(1, MS * 100);
    let (busy, rbusy) = request(2, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![2]);
    let t0 = Instant::now();
    let deadline = t0 + MS * 150;
    let (doomed, mut rdoomed) = with_deadline(request(1, 2, None), deadline);
    h.batcher
        .submit(doomed)
        .expect("100 ms predicted, 150 ms left: accepted");
    settle().await;
    // 60 ms later the instance frees up: 90 ms left, less than one execution.
    tokio::time::advance(MS * 60).await;
    h.permits.send(()).unwrap();
    let err = answer(&mut rdoomed).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::DeadlineExceeded
    );
    assert!(
        Instant::now() < deadline,
        "answered before its deadline, not when it expired"
    );
    rbusy.await.unwrap().unwrap();
    assert_eq!(
        *h.seen.lock().unwrap(),
        vec![2],
        "it never reached the model"
    );
    assert_eq!(h.batcher.depth(), 0);
    // The model goes on serving.
    let (next, rnext) = request(1, 2, None);
    h.batcher.submit(next).unwrap();
    h.permits.send(()).unwrap();
    rnext.await.unwrap().unwrap();
    assert_eq!(*h.seen.lock().unwrap(), vec![2, 1]);
}

#[tokio::test(start_paused = true)]
async fn without_batching_the_dispatch_check_uses_each_requests_own_execution() {
    // No dynamic batching: each request runs alone, in 100 ms.
    let h = harness("", 16).await;
    h.batcher.estimate.record(1, MS * 100);
    let (busy, mut rbusy) = request(2, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![2]);
    // First in line, with 150 ms left: it can run in time, whatever waits behind it.
    let (first, mut rfirst) = with_deadline(request(1, 2, None), Instant::now() + MS * 150);
    h.batcher.submit(first).unwrap();
    let mut behind = Vec::new();
    for _ in 0..3 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        behind.push(r);
    }
    settle().await;
    for _ in 0..5 {
        h.permits.send(()).unwrap();
    }
    // Never `.await` an answer here: a parked runtime would jump the paused clock to
    // the deadline while the instance thread is still finishing the busy request.
    answer(&mut rbusy).await.unwrap();
    answer(&mut rfirst)
        .await
        .expect("dispatched: one execution of its own fits its deadline");
    for r in behind {
        r.await.unwrap().unwrap();
    }
    assert_eq!(*h.seen.lock().unwrap(), vec![2, 1, 1, 1, 1]);
}
