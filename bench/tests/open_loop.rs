//! The generator against a fake KServe v2 server with scripted delays: open-loop
//! latency includes server stalls (no coordinated omission), falling behind the
//! schedule is reported, and deadlines are counted as DEADLINE_EXCEEDED. Also:
//! priorities are sent as the mix says and results are broken down per level.
//!
//! Every assertion leans on delays the fake server enforces (a request held for
//! 300 ms cannot be answered sooner however fast the machine), with wide margins in
//! the direction a slow, shared machine could push the numbers.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_bench::inputs::{self, DataKind, InputConfig};
use sluice_bench::load::{self, Load, PointConfig};
use sluice_bench::progress::Live;
use sluice_bench::report::{self, PointMeta, PointReport};
use sluice_bench::schedule::{Arrival, Profile};
use sluice_bench::target::{Target, TargetConfig};
use support::Behavior;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn point_config(load: Load) -> PointConfig {
    PointConfig {
        load,
        warmup: Duration::ZERO,
        deadline: None,
        max_in_flight: 4096,
        late_threshold: ms(10),
        drain: Duration::from_secs(5),
        workers: 1,
        seed: 1,
        priorities: None,
    }
}

async fn run(addr: SocketAddr, config: &PointConfig) -> PointReport {
    let target = Target::connect(&TargetConfig {
        url: addr.to_string(),
        connections: 1,
    })
    .await
    .unwrap();
    let input = InputConfig {
        model: "fake".into(),
        version: String::new(),
        batch_size: 1,
        shapes: vec![],
        data: DataKind::Random,
        file: None,
        seed: 1,
    };
    let request = Arc::new(inputs::build_request(&target, &input).await.unwrap());
    assert_eq!(
        request.inputs[0].shape,
        vec![1, 4],
        "the leading -1 is the batch dimension"
    );
    let stats = load::run_point(&target, request, config, &Live::new(false)).await;
    let profile = match &config.load {
        Load::Open { profile, .. } => Some(profile),
        Load::Closed { .. } => None,
    };
    report::point(
        &stats,
        &PointMeta {
            label: "test",
            concurrency: None,
            profile,
            batch_size: 1,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_includes_a_server_stall() {
    // Requests arriving from 500 ms to 800 ms after the first are held until 800 ms.
    let stall = ms(300);
    let (addr, seen) = support::start(Behavior::Stall {
        after: ms(500),
        length: stall,
    })
    .await;
    // 200/s for 2 s: about 60 of the 400 requests arrive during the stall, and the ones
    // that arrive at its start wait almost all of it; so at least the top 1% waits
    // more than 250 ms.
    let profile = Profile::steady(200.0, Duration::from_secs(2)).unwrap();
    let p = run(
        addr,
        &point_config(Load::Open {
            profile,
            arrival: Arrival::Constant,
        }),
    )
    .await;

    assert_eq!(
        p.codes.get("OK"),
        Some(&400),
        "every request is answered: {:?}",
        p.codes
    );
    assert_eq!((p.unsent, p.unfinished), (0, 0));
    let ok = p.latency_ms.ok.expect("successes were recorded");
    assert!(
        ok.p99 >= 250.0,
        "p99 {} ms must include the 300 ms stall",
        ok.p99
    );
    assert!(ok.max >= 250.0, "max {} ms", ok.max);
    // The stall is not smeared over the whole run: most requests were not held.
    assert!(ok.p50 < 150.0, "p50 {} ms", ok.p50);
    // Sent on schedule: the generator kept sending while earlier requests were held
    // (60 expected in the window; a closed loop would have sent 1).
    assert!(
        seen.stalled() >= 20,
        "only {} requests arrived during the stall",
        seen.stalled()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falling_behind_the_schedule_is_reported() {
    // Each answer takes 20 ms and only one request may be outstanding: at most ~50
    // sends per second, against 1000 scheduled.
    let (addr, _) = support::start(Behavior::Sleep(ms(20))).await;
    let profile = Profile::steady(1000.0, Duration::from_secs(1)).unwrap();
    let mut config = point_config(Load::Open {
        profile,
        arrival: Arrival::Constant,
    });
    config.max_in_flight = 1;
    let p = run(addr, &config).await;

    let s = p.schedule.as_ref().expect("open loop reports its schedule");
    assert!(s.fell_behind);
    assert!(p.sent <= 100, "{} sent", p.sent);
    assert!(p.unsent >= 900, "{} never sent", p.unsent);
    assert_eq!(s.unsent, p.unsent);
    assert!(
        s.late as f64 >= 0.5 * p.sent as f64,
        "{} late of {}",
        s.late,
        p.sent
    );
    assert!(s.max_lag_ms >= 500.0, "max lag {} ms", s.max_lag_ms);
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(
        p.warnings[0].contains("fell behind its schedule"),
        "{}",
        p.warnings[0]
    );
    assert!(
        p.warnings[0].contains("scheduled requests were never sent"),
        "{}",
        p.warnings[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_that_is_kept_raises_no_warning() {
    let (addr, _) = support::start(Behavior::Sleep(ms(1))).await;
    let profile = Profile::steady(100.0, Duration::from_secs(1)).unwrap();
    let p = run(
        addr,
        &point_config(Load::Open {
            profile,
            arrival: Arrival::Poisson,
        }),
    )
    .await;
    let s = p.schedule.as_ref().unwrap();
    assert_eq!(p.unsent, 0);
    // 10 ms late on a 2-core machine would take a long scheduler stall; allow a few.
    assert!(s.late <= p.sent / 10, "{} of {} late", s.late, p.sent);
    assert_eq!(p.answered, p.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_are_deadline_exceeded_and_not_goodput() {
    let (addr, _) = support::start(Behavior::Sleep(ms(400))).await;
    let mut config = point_config(Load::Closed {
        concurrency: 2,
        length: ms(600),
    });
    config.deadline = Some(ms(50));
    let p = run(addr, &config).await;

    assert!(
        p.codes.keys().all(|c| c == "DEADLINE_EXCEEDED"),
        "{:?}",
        p.codes
    );
    assert!(p.answered >= 2);
    assert_eq!(p.goodput_rps, 0.0);
    let rejected = p
        .latency_ms
        .rejected
        .expect("expired requests are recorded");
    // The client gives up at the deadline instead of waiting for the 400 ms answer.
    assert!(rejected.p50 >= 49.0 && rejected.max < 350.0, "{rejected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_clients_share_the_priority_interleaving() {
    let (addr, seen) = support::start(Behavior::RejectPriority(2)).await;
    let mut config = point_config(Load::Closed {
        concurrency: 4,
        length: ms(300),
    });
    config.priorities = Some("1:1,2:1".parse().unwrap());
    let p = run(addr, &config).await;

    // The four clients number their requests from one counter: the server saw the
    // levels alternate, whichever client sent what.
    let by_level = seen.priorities();
    assert_eq!(
        by_level.keys().copied().collect::<Vec<_>>(),
        [Some(1), Some(2)],
        "{by_level:?}"
    );
    assert!(
        by_level[&Some(1)].abs_diff(by_level[&Some(2)]) <= 1,
        "{by_level:?}"
    );
    let [one, two] = &p.by_priority[..] else {
        panic!("two levels: {:?}", p.by_priority)
    };
    assert_eq!((one.priority, two.priority), (1, 2));
    assert!(
        one.sent > 10 && two.sent > 10,
        "{} and {} sent",
        one.sent,
        two.sent
    );
    assert_eq!(one.sent + two.sent, p.sent);
    assert_eq!(
        (one.ok, one.rejected, one.success_ratio),
        (one.sent, 0, Some(1.0))
    );
    assert_eq!(
        (two.ok, two.rejected, two.success_ratio),
        (0, two.sent, Some(0.0))
    );
    assert_eq!(two.codes.get("UNAVAILABLE"), Some(&two.sent));
    assert_eq!(p.codes.get("OK"), Some(&one.ok));
    assert_eq!(p.codes.get("UNAVAILABLE"), Some(&two.rejected));
    assert!(one.latency_ms.ok.is_some() && two.latency_ms.ok.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_mix_no_priority_is_sent() {
    let (addr, seen) = support::start(Behavior::RejectPriority(1)).await;
    let p = run(
        addr,
        &point_config(Load::Closed {
            concurrency: 2,
            length: ms(100),
        }),
    )
    .await;
    let by_level = seen.priorities();
    assert_eq!(by_level.keys().collect::<Vec<_>>(), [&None], "{by_level:?}");
    assert!(p.by_priority.is_empty());
    assert_eq!(p.codes.keys().collect::<Vec<_>>(), ["OK"]);
}
