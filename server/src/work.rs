//! What passes between the batcher and the instances: a request's share of an
//! execution's result, and the measured execution time per batch size that the
//! instances write and the batcher reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::tensor::Tensor;

/// A request's share of one execution.
#[derive(Debug)]
pub struct Done {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    /// Longest wait of any request in the same execution (its oldest request's).
    pub batch_wait: Duration,
    pub compute: Duration,
    /// The part of `compute` beyond the batch the configuration asked for: see
    /// [`ComputeEstimate::beyond_gathered`].
    pub excess: Duration,
    /// Samples in the execution this request was part of.
    pub batch_size: usize,
}

/// Measured execution time per batch size (a running average per size), written by the
/// instances, read by admission and dispatch.
#[derive(Debug)]
pub struct ComputeEstimate {
    /// Index: batch size; nanoseconds, 0 = never measured.
    by_size: Box<[AtomicU64]>,
    /// The fastest execution seen per batch size, the same way: what a size costs
    /// without contention for the cores.
    fastest: Box<[AtomicU64]>,
}

/// Weight of a new measurement in a size's running average.
const ESTIMATE_SMOOTHING: f64 = 0.2;

impl ComputeEstimate {
    pub fn new(max_batch_size: usize) -> ComputeEstimate {
        let sizes = || (0..=max_batch_size).map(|_| AtomicU64::new(0)).collect();
        ComputeEstimate {
            by_size: sizes(),
            fastest: sizes(),
        }
    }

    pub fn record(&self, samples: usize, took: Duration) {
        let Some(slot) = self.by_size.get(samples) else {
            return;
        };
        let took = took.as_nanos().clamp(1, u128::from(u64::MAX)) as u64;
        if let Some(fastest) = self.fastest.get(samples) {
            let _ = fastest.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || took < old).then_some(took)
            });
        }
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            (old as f64 * (1.0 - ESTIMATE_SMOOTHING) + took as f64 * ESTIMATE_SMOOTHING) as u64
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    /// Time one execution of `samples` takes: measured at that size, else interpolated
    /// linearly between the nearest measured sizes below and above, else scaled in
    /// proportion from the one nearest measured size. `None` before any execution.
    pub fn estimate(&self, samples: usize) -> Option<Duration> {
        interpolate(&self.by_size, samples)
    }

    /// As [`estimate`](Self::estimate), from the fastest executions seen.
    pub fn fastest(&self, samples: usize) -> Option<Duration> {
        interpolate(&self.fastest, samples)
    }

    /// How much longer an execution of `total` samples takes than one of `gathered`,
    /// by the fastest executions seen (what the extra samples cost, not how slow a busy
    /// machine made them: a lower limit does not remove that contention): the samples the batching delay gathered (those that arrived
    /// within it of the batch's oldest request) are the batch the configuration asks
    /// for, and the rest joined because work stood in the queue. Zero before the
    /// estimate knows either size.
    pub fn beyond_gathered(&self, total: usize, gathered: usize) -> Duration {
        match (self.fastest(total), self.fastest(gathered)) {
            (Some(all), Some(asked)) if total > gathered => all.saturating_sub(asked),
            _ => Duration::ZERO,
        }
    }

    /// The largest batch whose estimated execution takes at most `budget` (at least 1),
    /// found by bisection on the estimate, which grows with the batch. `None` before any
    /// execution.
    pub fn most_within(&self, budget: Duration) -> Option<usize> {
        self.estimate(1)?;
        let (mut fits, mut over) = (1, self.by_size.len());
        while over - fits > 1 {
            let mid = fits + (over - fits) / 2;
            if self.estimate(mid).is_some_and(|t| t <= budget) {
                fits = mid;
            } else {
                over = mid;
            }
        }
        Some(fits)
    }
}

/// Time one execution of `samples` takes by `by_size` (nanoseconds per batch size, 0 =
/// never measured): measured at that size, else interpolated linearly between the
/// nearest measured sizes below and above, else scaled in proportion from the one
/// nearest measured size. `None` before any execution.
fn interpolate(by_size: &[AtomicU64], samples: usize) -> Option<Duration> {
    let top = by_size.len().saturating_sub(1).max(1);
    let samples = samples.clamp(1, top);
    let at = |n: usize| {
        by_size
            .get(n)
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&ns| ns > 0)
            .map(|ns| (n as f64, ns as f64))
    };
    let above = (samples..=top).find_map(at);
    let below = (1..samples).rev().find_map(at);
    let x = samples as f64;
    let ns = match (below, above) {
        (_, Some((n, t))) if n == x => t,
        (Some((n0, t0)), Some((n1, t1))) => t0 + (t1 - t0) * (x - n0) / (n1 - n0),
        (Some((n, t)), None) | (None, Some((n, t))) => t * x / n,
        (None, None) => return None,
    };
    Some(Duration::from_nanos(ns.max(1.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_largest_batch_within_a_budget() {
        let e = ComputeEstimate::new(32);
        assert_eq!(e.most_within(MS * 10), None, "nothing measured yet");
        // Per-sample cost (a compute-bound model): four samples in 4 ms.
        e.record(1, MS);
        e.record(32, MS * 32);
        assert_eq!(e.most_within(MS * 4), Some(4));
        // Mostly fixed cost (a small model): 32 samples cost twice one.
        let e = ComputeEstimate::new(32);
        e.record(1, MS);
        e.record(32, MS * 2);
        assert_eq!(e.most_within(MS * 4), Some(32));
        // A budget below one execution still allows one sample.
        assert_eq!(e.most_within(MS / 2), Some(1));
    }

    #[test]
    fn the_estimate_is_the_measured_size_or_derived_from_the_nearest() {
        let e = ComputeEstimate::new(8);
        e.record(4, MS * 40);
        assert_eq!(e.estimate(4), Some(MS * 40));
        // One measured size: other sizes in proportion to it, smaller and larger.
        assert_eq!(e.estimate(1), Some(MS * 10));
        assert_eq!(e.estimate(3), Some(MS * 30));
        assert_eq!(e.estimate(6), Some(MS * 60));
        assert_eq!(e.estimate(8), Some(MS * 80));
        // Between two measured sizes: interpolated between them.
        e.record(2, MS * 16);
        assert_eq!(e.estimate(2), Some(MS * 16));
        assert_eq!(e.estimate(3), Some(MS * 28));
        // Below the smallest measured size: in proportion to it.
        assert_eq!(e.estimate(1), Some(MS * 8));
        // Above the largest: in proportion to it.
        assert_eq!(e.estimate(6), Some(MS * 60));
        // Sizes outside 1..=max_batch_size are clamped into it.
        assert_eq!(e.estimate(0), e.estimate(1));
        assert_eq!(e.estimate(100), e.estimate(8));
        // Measurements above max_batch_size are ignored.
        e.record(9, MS);
        assert_eq!(e.estimate(8), Some(MS * 80));
        // A size's figure is a running average: a new measurement moves it a fifth.
        e.record(4, MS * 90);
        let avg = e.estimate(4).unwrap();
        assert!(avg.abs_diff(MS * 50) <= Duration::from_nanos(1), "{avg:?}");
    }

    #[test]
    fn the_excess_of_a_batch_is_what_its_extra_samples_cost_at_their_fastest() {
        let e = ComputeEstimate::new(32);
        assert_eq!(
            e.beyond_gathered(8, 1),
            Duration::ZERO,
            "nothing measured yet"
        );
        e.record(1, MS);
        e.record(8, MS * 8);
        // A busy machine slowed the next batch of eight: the average follows it, the
        // fastest does not.
        e.record(8, MS * 20);
        assert!(e.estimate(8).unwrap() > MS * 10);
        assert_eq!(e.fastest(8), Some(MS * 8));
        assert_eq!(e.beyond_gathered(8, 1), MS * 7);
        // Four gathered by the batching delay: four (interpolated) of the eight asked for.
        assert_eq!(e.beyond_gathered(8, 4), MS * 4);
        // Everything gathered, or a batch no larger than what was gathered: no excess.
        assert_eq!(e.beyond_gathered(4, 4), Duration::ZERO);
        assert_eq!(e.beyond_gathered(2, 4), Duration::ZERO);
    }
}
