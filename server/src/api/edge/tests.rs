//! The edge's parts on their own: budget, framing, body limits, accept back-off.

use super::*;

fn message(len: u32) -> Vec<u8> {
    let mut m = vec![0u8];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend(std::iter::repeat_n(7u8, len as usize));
    m
}

fn events(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<FrameEvent> {
    let mut seen = Vec::new();
    for chunk in chunks {
        framer
            .feed::<()>(chunk, |e| {
                seen.push(e);
                Ok(())
            })
            .unwrap();
    }
    seen
}

#[test]
fn framer_follows_messages_across_any_split() {
    let mut stream = message(3);
    stream.extend(message(0));
    stream.extend(message(70_000));
    let want = vec![
        FrameEvent::Header(3),
        FrameEvent::Complete,
        FrameEvent::Header(0),
        FrameEvent::Complete,
        FrameEvent::Header(70_000),
        FrameEvent::Complete,
    ];
    for split in [1, 2, 4, 5, 6, 7, 13, 4096, stream.len()] {
        let chunks: Vec<&[u8]> = stream.chunks(split).collect();
        let mut framer = Framer::default();
        assert_eq!(events(&mut framer, &chunks), want, "chunks of {split}");
        assert!(!framer.mid_message());
    }
}

#[test]
fn framer_reports_a_header_before_its_body_arrives() {
    let mut framer = Framer::default();
    let seen = events(&mut framer, &[&[0, 0x04, 0, 0, 0]]);
    assert_eq!(seen, vec![FrameEvent::Header(64 << 20)]);
    assert!(framer.mid_message());
    let mut half = Framer::default();
    assert!(events(&mut half, &[&[0, 0]]).is_empty());
    assert!(half.mid_message(), "half a header is part of a message");
}

#[test]
fn framer_stops_at_the_first_error() {
    let mut framer = Framer::default();
    let mut stream = message(2);
    stream.extend(message(9));
    let mut seen = 0;
    let result = framer.feed(&stream, |e| {
        seen += 1;
        match e {
            FrameEvent::Header(9) => Err("too big"),
            FrameEvent::Header(_) | FrameEvent::Complete => Ok(()),
        }
    });
    assert_eq!(result, Err("too big"));
    assert_eq!(seen, 3);
}

#[test]
fn budget_reserves_in_units_and_gives_back_on_drop() {
    let budget = Budget::new(10 * BUDGET_UNIT, BUDGET_UNIT);
    let a = budget.try_reserve(1).expect("one unit");
    assert_eq!(budget.in_use(), BUDGET_UNIT);
    let b = budget.try_reserve(9 * BUDGET_UNIT).expect("nine units");
    assert!(budget.try_reserve(1).is_none(), "full");
    drop(a);
    let c = budget.try_reserve(BUDGET_UNIT).expect("room again");
    assert!(budget.try_reserve(BUDGET_UNIT + 1).is_none());
    drop((b, c));
    assert_eq!(budget.in_use(), 0);
    assert!(
        budget.try_reserve(11 * BUDGET_UNIT).is_none(),
        "over the whole budget"
    );
}

#[test]
fn large_reservations_leave_a_quarter_of_the_budget_to_small_ones() {
    let mib = 1 << 20;
    let budget = Budget::new(64 * mib, 8 * mib);
    let mut large = Vec::new();
    while let Some(r) = budget.try_reserve(8 * mib) {
        large.push(r);
    }
    // Six fill the 48 MiB large share, though 16 MiB of the budget are left.
    assert_eq!(large.len(), 6);
    let mut small = Vec::new();
    while let Some(r) = budget.try_reserve(mib) {
        small.push(r);
    }
    assert_eq!(small.len(), 16, "the quarter kept for small requests");
    // A budget no bigger than the largest message still lets one in.
    let tight = Budget::new(8 * mib, 8 * mib);
    assert!(tight.try_reserve(8 * mib + GRPC_HEADER_BYTES).is_some());
}

#[test]
fn reservation_is_replaced_message_by_message() {
    let budget = Budget::new(2 * BUDGET_UNIT, BUDGET_UNIT);
    let r = Reservation::default();
    r.replace(budget.try_reserve(2 * BUDGET_UNIT));
    assert_eq!(budget.in_use(), 2 * BUDGET_UNIT);
    r.replace(None);
    r.replace(budget.try_reserve(BUDGET_UNIT));
    assert_eq!(budget.in_use(), BUDGET_UNIT);
    // The codec adds the decoded heap beside the wire bytes; both go back together.
    let call = CallBudget {
        budget: budget.clone(),
        reservation: Arc::new(Reservation::default()),
    };
    call.reserve(BUDGET_UNIT / 2).expect("fits");
    assert_eq!(budget.in_use(), 2 * BUDGET_UNIT);
    let refused = call.reserve(BUDGET_UNIT).expect_err("full");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.metadata().get(RETRY_PUSHBACK_HEADER).is_some());
    drop(call);
    assert_eq!(budget.in_use(), BUDGET_UNIT);
    drop(r);
    assert_eq!(budget.in_use(), 0);
}

#[test]
fn log_limiter_lets_one_line_through_per_period_and_counts_the_rest() {
    let t0 = Instant::now();
    let mut log = LogLimiter::new(Duration::from_secs(10));
    assert_eq!(log.allow(t0), Some(0));
    for i in 1..=5 {
        assert_eq!(log.allow(t0 + Duration::from_secs(i)), None);
    }
    assert_eq!(log.allow(t0 + Duration::from_secs(10)), Some(5));
    assert_eq!(log.allow(t0 + Duration::from_secs(11)), None);
    assert_eq!(log.allow(t0 + Duration::from_secs(25)), Some(1));
}

#[test]
fn method_rules() {
    let infer = rules_for(INFER_PATH, 1 << 26);
    assert_eq!(
        (infer.max_message, infer.free_below, infer.streaming),
        (1 << 26, 0, false)
    );
    assert!(rules_for(STREAM_INFER_PATH, 1 << 26).streaming);
    let meta = rules_for("/inference.GRPCInferenceService/ModelMetadata", 1 << 26);
    assert_eq!(meta.max_message, CONTROL_MAX_MESSAGE_BYTES);
    assert!(!meta.streaming && meta.free_below > 0);
    assert!(rules_for("/grpc.health.v1.Health/Watch", 1 << 26).streaming);
    assert_eq!(rules_for("/x/Y", 2048).max_message, 2048);
}

#[tokio::test(start_paused = true)]
async fn a_connection_is_idle_only_after_its_last_call_ends() {
    let activity = Activity::new();
    let timeout = Duration::from_secs(30);
    let call = activity.start();
    let idle = activity.idle_for(timeout, timeout);
    tokio::pin!(idle);
    tokio::select! {
        _ = &mut idle => panic!("a call is in progress"),
        _ = tokio::time::sleep(timeout * 3) => {}
    }
    drop(call);
    let ended = Instant::now();
    idle.await;
    assert_eq!(Instant::now() - ended, timeout);
}

#[tokio::test(start_paused = true)]
async fn a_new_call_restarts_the_idle_clock() {
    let activity = Activity::new();
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    let watcher = {
        let activity = activity.clone();
        tokio::spawn(async move { activity.idle_for(Duration::from_secs(5), timeout).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(activity.start());
    tokio::time::sleep(Duration::from_secs(20)).await;
    drop(activity.start());
    watcher.await.unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(52));
}

#[tokio::test(start_paused = true)]
async fn a_connection_without_any_call_is_idle_after_the_first_call_timeout() {
    let activity = Activity::new();
    let start = Instant::now();
    activity
        .idle_for(Duration::from_secs(5), Duration::from_secs(300))
        .await;
    assert_eq!(Instant::now() - start, Duration::from_secs(5));
}
