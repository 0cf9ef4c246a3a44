//! A model's statistics as the ModelStatistics RPC reports them: plain counters the
//! request path and the instances add to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Counts and cumulative durations as the ModelStatistics RPC reports them.
#[derive(Debug, Clone, Default)]
pub struct ModelStats {
    pub inference_count: u64,
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last inference; 0 if none.
    pub last_inference_ms: u64,
    pub success: Tally,
    pub fail: Tally,
    pub queue: Tally,
    pub compute_infer: Tally,
    /// Executions and their compute time per batch size seen.
    pub batches: std::collections::BTreeMap<u64, Tally>,
}

/// A count and a total duration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub count: u64,
    pub total: Duration,
}

impl Tally {
    pub fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
    }
}

impl ModelStats {
    pub fn record_success(
        &mut self,
        total: Duration,
        queue: Duration,
        compute: Duration,
        samples: usize,
    ) {
        self.inference_count += samples as u64;
        self.success.add(total);
        self.queue.add(queue);
        self.compute_infer.add(compute);
        self.touch();
    }

    pub fn record_failure(&mut self, total: Duration) {
        self.fail.add(total);
        self.touch();
    }

    /// One execution of the model on a batch of `samples`.
    pub fn record_execution(&mut self, samples: usize, compute: Duration) {
        self.execution_count += 1;
        self.batches.entry(samples as u64).or_default().add(compute);
    }

    fn touch(&mut self) {
        self.last_inference_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
    }
}
