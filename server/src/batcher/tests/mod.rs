//! The actor end to end, with paused time and a backend the test controls: flushing,
//! closing, dropping dead work, refusing at a full queue (here); priorities and
//! deadlines, scaling and the watchdog (in the child modules). The shared harness
//! lives here.

use std::sync::Mutex;

use super::*;
use crate::backend::{Backend, BackendError};
use crate::pool::Loader;
use crate::spec::{parse_text, spec_from_config};

use super::test_support::key;

// ---- the actor, with paused time and a backend the test controls -------------------

/// Records the batch size of every forward; each forward waits for one permit.
struct Gated {
    permits: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    seen: Arc<Mutex<Vec<i64>>>,
}

impl Backend for Gated {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        self.seen.lock().unwrap().push(inputs[0].batch());
        self.permits
            .lock()
            .unwrap()
            .recv()
            .map_err(|_| BackendError::Forward("gate closed".into()))?;
        Ok(inputs.to_vec())
    }
}

struct Harness {
    batcher: Batcher,
    permits: std::sync::mpsc::Sender<()>,
    seen: Arc<Mutex<Vec<i64>>>,
    /// Backends loaded so far, and alive now.
    loads: Arc<AtomicUsize>,
    alive: Arc<AtomicUsize>,
}

struct Counted(Gated, Arc<AtomicUsize>);

impl Backend for Counted {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        self.0.forward(inputs)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

fn spec_for(dynamic: &str) -> Arc<crate::spec::ModelSpec> {
    let text = format!(
        r#"backend: "sluice_synthetic" max_batch_size: 8
           input [ {{ name: "x" data_type: TYPE_FP32 dims: [-1] }} ]
           output [ {{ name: "y" data_type: TYPE_FP32 dims: [-1] }} ] {dynamic}"#
    );
    Arc::new(spec_from_config(parse_text(&text).unwrap(), "m").unwrap())
}

/// A batcher over gated instances. `load` decides each load's outcome (it may block).
async fn harness_with(
    dynamic: &str,
    max_queue_size: usize,
    scaling: Scaling,
    load: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) -> Harness {
    let spec = spec_for(dynamic);
    let (permits, rx) = std::sync::mpsc::channel();
    let rx = Arc::new(Mutex::new(rx));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let loads = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let (r, s, l, a) = (rx.clone(), seen.clone(), loads.clone(), alive.clone());
    let loader: Loader = Arc::new(move || {
        load().map_err(|message| BackendError::Load {
            path: "m".into(),
            message,
        })?;
        l.fetch_add(1, Ordering::SeqCst);
        a.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Counted(
            Gated {
                permits: r.clone(),
                seen: s.clone(),
            },
            a.clone(),
        )) as Box<dyn Backend>)
    });
    let mut pool = InstancePool::with_loader(
        spec.clone(),
        loader,
        Arc::from(Vec::new()),
        Default::default(),
    );
    let initial = scaling.min_instances.max(1); // as LoadedModel::load does
    let pool = tokio::task::spawn_blocking(move || {
        pool.start(initial).expect("initial instances load");
        pool
    })
    .await
    .unwrap();
    let batcher = Batcher::spawn(
        "m".into(),
        spec.batching.clone(),
        scaling,
        QueueLimits {
            max_queue_size,
            priority_levels: 2,
            predict_wait: true,
        },
        pool,
    );
    Harness {
        batcher,
        permits,
        seen,
        loads,
        alive,
    }
}

const ONE: Scaling = Scaling {
    min_instances: 1,
    max_instances: 1,
    idle_timeout: Duration::from_secs(3600),
    // Off: with paused time a parked runtime jumps the clock to the next timer while
    // a gated instance thread is still running; the watchdog has tests of its own.
    max_execution: None,
};

async fn harness(dynamic: &str, max_queue_size: usize) -> Harness {
    harness_with(dynamic, max_queue_size, ONE, || Ok(())).await
}

fn request(
    samples: usize,
    width: i64,
    expires: Option<Instant>,
) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
    let data = vec![0u8; samples * width as usize * 4];
    let (reply, rx) = oneshot::channel();
    let q = Queued {
        inputs: vec![Tensor::new(
            DataType::Fp32,
            vec![samples as i64, width],
            data.into(),
        )],
        samples,
        key: key(&[width]),
        arrival: Instant::now(),
        expires,
        deadline: None,
        priority: 1,
        preempt: false,
        reply,
    };
    (q, rx)
}

/// Let every task run until all are idle (paused time: no timer fires early).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Let the instance run `n` executions, then wait for every one of `answers` to
/// succeed, in order.
async fn run_and_answer(
    h: &Harness,
    n: usize,
    answers: impl IntoIterator<Item = oneshot::Receiver<Result<Done, Error>>>,
) {
    for _ in 0..n {
        h.permits.send(()).unwrap();
    }
    for r in answers {
        r.await.unwrap().unwrap();
    }
}

/// Wait (in real time, bounded) until the instance has started `n` forwards.
async fn forwards(h: &Harness, n: usize) -> Vec<i64> {
    for _ in 0..2000 {
        let seen = h.seen.lock().unwrap().clone();
        if seen.len() >= n {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(1));
        tokio::task::yield_now().await;
    }
    panic!(
        "only {:?} forwards started, expected {n}",
        h.seen.lock().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn flushes_at_the_delay_not_before() {
    let h = harness(
        "dynamic_batching { max_queue_delay_microseconds: 5000 }",
        16,
    )
    .await;
    let (a, ra) = request(1, 2, None);
    let (b, rb) = request(2, 2, None);
    h.batcher.submit(a).unwrap();
    h.batcher.submit(b).unwrap();
    settle().await;
    tokio::time::sleep(Duration::from_millis(4)).await;
    settle().await;
    assert!(
        h.seen.lock().unwrap().is_empty(),
        "flushed before the delay"
    );
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(forwards(&h, 1).await, vec![3]);
    h.permits.send(()).unwrap();
    let (da, db) = (ra.await.unwrap().unwrap(), rb.await.unwrap().unwrap());
    assert_eq!(
        (da.outputs[0].shape.clone(), db.outputs[0].shape.clone()),
        (vec![1, 2], vec![2, 2])
    );
    assert_eq!((da.batch_size, db.batch_size), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn with_zero_delay_the_batch_grows_while_the_instance_is_busy() {
    let h = harness("dynamic_batching { }", 16).await;
    let (first, r1) = request(1, 2, None);
    h.batcher.submit(first).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    let mut rest = Vec::new();
    for _ in 0..4 {
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        rest.push(r);
    }
    settle().await;
    h.permits.send(()).unwrap(); // the instance frees up: all four go out together
    r1.await.unwrap().unwrap();
    assert_eq!(forwards(&h, 2).await, vec![1, 4]);
    h.permits.send(()).unwrap();
    for r in rest {
        assert_eq!(r.await.unwrap().unwrap().batch_size, 4);
    }
}

#[tokio::test(start_paused = true)]
async fn closing_the_channel_flushes_a_partial_batch() {
    let h = harness(
        "dynamic_batching { max_queue_delay_microseconds: 10000000 }",
        16,
    )
    .await;
    let (a, ra) = request(1, 2, None);
    h.batcher.submit(a).unwrap();
    settle().await;
    let Harness {
        batcher,
        permits,
        seen,
        ..
    } = h;
    drop(batcher);
    permits.send(()).unwrap();
    let done = ra.await.unwrap().unwrap();
    assert_eq!(done.batch_size, 1);
    assert_eq!(*seen.lock().unwrap(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn expired_and_cancelled_requests_never_reach_the_model() {
    let h = harness("dynamic_batching { }", 16).await;
    let (busy, rbusy) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    assert_eq!(forwards(&h, 1).await, vec![1]);
    // While the instance is busy: one expires, one is cancelled, one stays.
    let (expiring, rexp) = request(2, 2, Some(Instant::now() + Duration::from_millis(10)));
    let (cancelled, rcan) = request(3, 2, None);
    let (kept, rkept) = request(1, 2, None);
    for q in [expiring, cancelled, kept] {
        h.batcher.submit(q).unwrap();
    }
    drop(rcan);
    let expired = rexp.await.unwrap().unwrap_err(); // answered at its deadline
    assert!(
        matches!(expired, Error::DeadlineExceeded { .. }),
        "{expired}"
    );
    h.permits.send(()).unwrap();
    rbusy.await.unwrap().unwrap();
    h.permits.send(()).unwrap();
    assert_eq!(rkept.await.unwrap().unwrap().batch_size, 1);
    assert_eq!(
        *h.seen.lock().unwrap(),
        vec![1, 1],
        "only the live request ran"
    );
    assert_eq!(h.batcher.depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let h = harness("dynamic_batching { }", 2).await;
    let (busy, _r0) = request(1, 2, None);
    h.batcher.submit(busy).unwrap();
    forwards(&h, 1).await;
    let (a, _ra) = request(1, 2, None);
    let (b, _rb) = request(1, 2, None);
    h.batcher.submit(a).unwrap();
    h.batcher.submit(b).unwrap();
    // `submit` is synchronous: the refusal cannot wait for anything.
    for _ in 0..100 {
        let (c, _rc) = request(1, 2, None);
        let err = h.batcher.submit(c).unwrap_err();
        assert!(matches!(err, Error::Overloaded { .. }), "{err}");
    }
    assert_eq!(
        h.batcher.depth(),
        2,
        "the queue never holds more than max_queue_size"
    );
    for _ in 0..3 {
        h.permits.send(()).unwrap();
    }
}

/// Wait (real time, bounded) until `counter` reads `want`.
async fn until(counter: &AtomicUsize, want: usize) {
    for _ in 0..2000 {
        if counter.load(Ordering::SeqCst) == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
        tokio::task::yield_now().await;
    }
    panic!(
        "counter stayed at {} (wanted {want})",
        counter.load(Ordering::SeqCst)
    );
}

const MS: Duration = Duration::from_millis(1);

fn at_priority(
    (q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>),
    priority: u32,
) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
    (Queued { priority, ..q }, rx)
}

fn with_deadline(
    (q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>),
    deadline: Instant,
) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
    (
        Queued {
            deadline: Some(deadline),
            ..q
        },
        rx,
    )
}

/// Wait (real time, bounded) for a request's answer without ever parking the runtime:
/// a parked runtime with paused time would jump the clock to the next timer (a
/// request's deadline) while an instance thread is still finishing.
async fn answer(rx: &mut oneshot::Receiver<Result<Done, Error>>) -> Result<Done, Error> {
    for _ in 0..2000 {
        match rx.try_recv() {
            Ok(answer) => return answer,
            Err(oneshot::error::TryRecvError::Empty) => {
                std::thread::sleep(MS);
                tokio::task::yield_now().await;
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                panic!("the request was dropped without an answer")
            }
        }
    }
    panic!("no answer within 2 s");
}

mod priority;
mod scaling;
