//! How long a new request would wait, from what is queued ahead of it and the measured
//! execution times.

use std::time::Duration;

use crate::spec::BatchPolicy;
use crate::work::ComputeEstimate;

/// How long a request would wait and run: `ahead` samples queued before it (its own
/// included) go out in rounds of one batch per instance.
pub fn predicted_wait(
    policy: &BatchPolicy,
    estimate: &ComputeEstimate,
    ahead_samples: usize,
    ahead_requests: usize,
    own_samples: usize,
    instances: usize,
) -> Option<Duration> {
    let instances = instances.max(1);
    if !policy.combine {
        // One request per execution.
        let rounds = ahead_requests.div_ceil(instances).max(1);
        return estimate.estimate(own_samples).map(|t| t * rounds as u32);
    }
    let total = ahead_samples.max(own_samples);
    let per_round = instances * policy.max_batch_size.max(1);
    let rounds = total.div_ceil(per_round).max(1);
    let batch = total.div_ceil(instances).min(policy.max_batch_size.max(1));
    estimate.estimate(batch).map(|t| t * rounds as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::test_support::policy;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn predicted_wait_with_batching_counts_rounds_of_full_batches() {
        let e = ComputeEstimate::new(8);
        e.record(2, MS * 20);
        e.record(8, MS * 80);
        let p = policy(8, &[], 0);
        // Alone in the queue: its own execution.
        assert_eq!(predicted_wait(&p, &e, 2, 1, 2, 1), Some(MS * 20));
        // A full batch with it: one round of 8.
        assert_eq!(predicted_wait(&p, &e, 8, 3, 2, 1), Some(MS * 80));
        // 20 samples, one instance: three rounds of full batches.
        assert_eq!(predicted_wait(&p, &e, 20, 5, 1, 1), Some(MS * 240));
        // Two instances: 16 per round, two rounds.
        assert_eq!(predicted_wait(&p, &e, 20, 5, 1, 2), Some(MS * 160));
        // Four samples over two instances: one round of batches of 2.
        assert_eq!(predicted_wait(&p, &e, 4, 2, 2, 2), Some(MS * 20));
        // No instance counted: as if one.
        assert_eq!(
            predicted_wait(&p, &e, 20, 5, 1, 0),
            predicted_wait(&p, &e, 20, 5, 1, 1)
        );
        // At least its own samples, whatever is counted ahead.
        assert_eq!(predicted_wait(&p, &e, 0, 0, 8, 1), Some(MS * 80));
    }

    #[test]
    fn predicted_wait_without_batching_counts_one_execution_per_request() {
        let e = ComputeEstimate::new(8);
        e.record(2, MS * 20);
        let alone = BatchPolicy {
            combine: false,
            ..policy(8, &[], 0)
        };
        assert_eq!(predicted_wait(&alone, &e, 2, 1, 2, 1), Some(MS * 20));
        // Five requests over two instances: three rounds, samples ahead do not matter.
        assert_eq!(predicted_wait(&alone, &e, 2, 5, 2, 2), Some(MS * 60));
        assert_eq!(predicted_wait(&alone, &e, 40, 5, 2, 2), Some(MS * 60));
        // Its own size sets each execution's time (4 samples: scaled from 2).
        assert_eq!(predicted_wait(&alone, &e, 4, 1, 4, 1), Some(MS * 40));
    }

    #[test]
    fn no_estimate_before_any_execution() {
        let e = ComputeEstimate::new(8);
        for n in [0, 1, 4, 8, 100] {
            assert_eq!(e.estimate(n), None);
        }
        let batched = policy(8, &[], 0);
        assert_eq!(predicted_wait(&batched, &e, 4, 2, 1, 1), None);
        let alone = BatchPolicy {
            combine: false,
            ..batched
        };
        assert_eq!(predicted_wait(&alone, &e, 4, 2, 1, 1), None);
    }
}
