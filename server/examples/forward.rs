//! In-process forward time and compute limit of a model, without the gateway: each of
//! `--instances` OS threads loads its own copy (with `--threads` intra-op threads) and
//! runs forward back to back for `--seconds` per batch size. The difference between this
//! and the served latency is the gateway's own overhead.
//!
//!     cargo run --release -p sluice --example forward -- models/mlp --batch 1,8,32
//!
//! With `--rate R` each instance runs R forwards per second, evenly paced, instead of
//! back to back: the CPU per forward column then shows what a model costs at a steady
//! request rate, the yardstick for the server's CPU per inference at the same rate
//! (idle intra-op threads that spin between forwards show up here as they do there).
//! Like the server, the program runs with `OMP_WAIT_POLICY=PASSIVE` unless the
//! environment sets a wait policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use sluice::backend;
use sluice::config::BackendOptions;
use sluice::repository::CONFIG_FILE;
use sluice::spec::{load_spec, ModelSpec};
use sluice::tensor::{element_count, Tensor};

#[derive(Parser)]
struct Args {
    /// Model directory (with config.pbtxt and version 1).
    model_dir: PathBuf,
    /// Batch sizes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<i64>,
    /// Model instances, each on its own thread.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Intra-op threads per instance.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measuring time per batch size.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Forwards per second per instance, evenly paced; 0 runs them back to back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

/// CPU time (user + system) this process has used so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn inputs(spec: &ModelSpec, batch: i64) -> Vec<Tensor> {
    let mut sorted = spec.inputs.clone();
    sorted.sort_by_key(|t| t.position);
    sorted
        .iter()
        .map(|t| {
            let shape: Vec<i64> = std::iter::once(batch)
                .chain(t.dims.iter().map(|&d| d.max(1)))
                .collect();
            let data = vec![0u8; element_count(&shape) * t.dtype.size()];
            Tensor::new(t.dtype, shape, data.into())
        })
        .collect()
}

fn main() {
    if let Err(e) = sluice::backend::openmp::ensure_default_wait_policy() {
        eprintln!("cannot re-execute with OMP_WAIT_POLICY=PASSIVE: {e}");
    }
    let args = Args::parse();
    let name = args
        .model_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("model dir has a name")
        .to_owned();
    let spec = Arc::new(load_spec(args.model_dir.join(CONFIG_FILE)).expect("valid config"));
    let options = BackendOptions {
        intra_op_threads: Some(args.threads),
    };
    let version_dir = args.model_dir.join("1");
    println!(
        "model {name}: {} instance(s) x {} intra-op thread(s)",
        args.instances, args.threads
    );
    println!(
        "{:>6} {:>14} {:>14} {:>16} {:>18}",
        "batch", "p50 forward", "p99 forward", "inferences/s", "CPU per forward"
    );
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    for &batch in &args.batch {
        let measure = Duration::from_secs_f64(args.seconds);
        // The instances and this thread: the CPU count starts once every copy is loaded
        // and warm.
        let barrier = Arc::new(std::sync::Barrier::new(args.instances + 1));
        let workers: Vec<_> = (0..args.instances)
            .map(|_| {
                let (spec, dir, barrier) = (spec.clone(), version_dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut model = backend::load(&spec, &dir, &options).expect("model loads");
                    let input = inputs(&spec, batch);
                    for _ in 0..10 {
                        model.forward(&input).expect("forward");
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let mut times = Vec::new();
                    let mut next = start;
                    while start.elapsed() < measure {
                        if let Some(pace) = pace {
                            std::thread::sleep(next.saturating_duration_since(Instant::now()));
                            next += pace;
                        }
                        let t = Instant::now();
                        model.forward(&input).expect("forward");
                        times.push(t.elapsed());
                    }
                    (times, start.elapsed())
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut rate = 0.0;
        barrier.wait();
        let cpu_before = process_cpu();
        for w in workers {
            let (times, wall) = w.join().expect("worker");
            rate += times.len() as f64 * batch as f64 / wall.as_secs_f64();
            all.extend(times);
        }
        let cpu = process_cpu().saturating_sub(cpu_before);
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        println!(
            "{batch:>6} {:>11.1} us {:>11.1} us {rate:>16.0} {:>15.1} us",
            pct(0.5).as_secs_f64() * 1e6,
            pct(0.99).as_secs_f64() * 1e6,
            cpu.as_secs_f64() * 1e6 / all.len().max(1) as f64
        );
    }
}
