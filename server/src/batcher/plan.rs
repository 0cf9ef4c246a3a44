//! Which queued requests go out together, and when: a pure function of the queue, the
//! policy and the time, unit-tested without a runtime.

use tokio::time::Instant;

use super::{BatchKey, Queued};
use crate::spec::BatchPolicy;

/// The view of a queued request that the policy needs.
pub trait Pending {
    fn samples(&self) -> usize;
    fn key(&self) -> &BatchKey;
    fn arrival(&self) -> Instant;
    /// Priority level, 1 the highest.
    fn priority(&self) -> u32 {
        1
    }
}

impl Pending for Queued {
    fn samples(&self) -> usize {
        self.samples
    }
    fn priority(&self) -> u32 {
        self.priority
    }
    fn key(&self) -> &BatchKey {
        &self.key
    }
    fn arrival(&self) -> Instant {
        self.arrival
    }
}

/// The batch the policy would form now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the queue, oldest first.
    pub take: Vec<usize>,
    pub samples: usize,
    /// Whether it should go out as soon as an instance is free.
    pub ready: bool,
    /// If not ready: when it will be (the oldest request's arrival + max delay).
    pub ready_at: Option<Instant>,
}

/// Decide the next batch. `None` when the queue is empty.
// Kept whole: the batching rules in the order they apply (shape, level, size, preferred size, delay).
pub fn plan<P: Pending>(policy: &BatchPolicy, queue: &[P], now: Instant) -> Option<Plan> {
    let head = queue.first()?;
    if !policy.combine {
        return Some(Plan {
            take: vec![0],
            samples: head.samples(),
            ready: true,
            ready_at: None,
        });
    }
    // Greedily collect, oldest first, the requests that fit beside the head. A batch
    // carries one priority level (the queue is in priority order, so the head's): a
    // lower level's samples would lengthen a higher level's execution, so lower levels
    // run in batches of their own, formed when no higher level waits.
    let mut take = Vec::new();
    let mut samples = 0;
    for (i, p) in queue.iter().enumerate() {
        if p.key() != head.key()
            || p.priority() != head.priority()
            || samples + p.samples() > policy.max_batch_size
        {
            continue;
        }
        take.push(i);
        samples += p.samples();
        if samples == policy.max_batch_size {
            return Some(Plan {
                take,
                samples,
                ready: true,
                ready_at: None,
            });
        }
    }
    // The largest preferred size that a prefix of the collected requests forms exactly.
    let mut prefix = 0;
    let mut best: Option<(usize, usize)> = None; // (count, samples)
    for (n, &i) in take.iter().enumerate() {
        prefix += queue[i].samples();
        if policy.preferred.contains(&prefix) {
            best = Some((n + 1, prefix));
        }
    }
    if let Some((count, size)) = best {
        take.truncate(count);
        return Some(Plan {
            take,
            samples: size,
            ready: true,
            ready_at: None,
        });
    }
    let ready_at = head.arrival() + policy.max_queue_delay;
    let ready = now >= ready_at;
    Some(Plan {
        take,
        samples,
        ready,
        ready_at: (!ready).then_some(ready_at),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::batcher::test_support::{key, policy};

    struct P {
        samples: usize,
        key: BatchKey,
        arrival: Instant,
    }

    impl Pending for P {
        fn samples(&self) -> usize {
            self.samples
        }
        fn key(&self) -> &BatchKey {
            &self.key
        }
        fn arrival(&self) -> Instant {
            self.arrival
        }
    }

    fn queue(t0: Instant, items: &[(usize, &[i64], u64)]) -> Vec<P> {
        items
            .iter()
            .map(|&(samples, dims, at_ms)| P {
                samples,
                key: key(dims),
                arrival: t0 + Duration::from_millis(at_ms),
            })
            .collect()
    }

    #[test]
    fn no_flush_before_the_delay_then_flush_at_it() {
        let t0 = Instant::now();
        let q = queue(t0, &[(1, &[4], 0), (2, &[4], 1)]);
        let p = plan(&policy(8, &[], 5), &q, t0 + Duration::from_millis(4)).unwrap();
        assert!(!p.ready);
        assert_eq!(p.ready_at, Some(t0 + Duration::from_millis(5)));
        let p = plan(&policy(8, &[], 5), &q, t0 + Duration::from_millis(5)).unwrap();
        assert!(p.ready);
        assert_eq!((p.take, p.samples), (vec![0, 1], 3));
    }

    #[test]
    fn flush_at_max_batch_size_without_waiting() {
        let t0 = Instant::now();
        let q = queue(
            t0,
            &[(3, &[4], 0), (3, &[4], 0), (2, &[4], 0), (1, &[4], 0)],
        );
        let p = plan(&policy(8, &[], 1000), &q, t0).unwrap();
        assert!(p.ready);
        assert_eq!((p.take, p.samples), (vec![0, 1, 2], 8));
    }

    #[test]
    fn a_request_that_would_overflow_waits_for_the_next_batch() {
        let t0 = Instant::now();
        let q = queue(t0, &[(5, &[4], 0), (4, &[4], 0), (3, &[4], 0)]);
        let p = plan(&policy(8, &[], 0), &q, t0).unwrap();
        assert_eq!((p.take, p.samples), (vec![0, 2], 8));
    }

    #[test]
    fn preferred_size_goes_out_at_once() {
        let t0 = Instant::now();
        let q = queue(t0, &[(2, &[4], 0), (2, &[4], 0), (1, &[4], 0)]);
        // 4 is preferred and reachable (2+2); 8, the larger one, is not reachable yet.
        let p = plan(&policy(16, &[4, 8], 100), &q, t0).unwrap();
        assert!(p.ready, "{p:?}");
        assert_eq!((p.take.clone(), p.samples), (vec![0, 1], 4));
        // Only 8 is preferred: 5 samples wait for the delay.
        let p = plan(&policy(16, &[8], 100), &q, t0).unwrap();
        assert!(!p.ready);
        assert_eq!(p.ready_at, Some(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn mixed_shapes_are_kept_apart() {
        let t0 = Instant::now();
        let q = queue(
            t0,
            &[(1, &[4], 0), (1, &[5], 0), (1, &[4], 0), (1, &[5], 0)],
        );
        let p = plan(&policy(8, &[], 0), &q, t0).unwrap();
        assert_eq!(p.take, vec![0, 2]);
        let rest = queue(t0, &[(1, &[5], 0), (1, &[5], 0)]);
        assert_eq!(
            plan(&policy(8, &[], 0), &rest, t0).unwrap().take,
            vec![0, 1]
        );
    }

    #[test]
    fn without_dynamic_batching_each_request_goes_alone() {
        let t0 = Instant::now();
        let q = queue(t0, &[(3, &[4], 0), (1, &[4], 0)]);
        let unbatched = BatchPolicy {
            combine: false,
            ..policy(8, &[], 100)
        };
        let p = plan(&unbatched, &q, t0).unwrap();
        assert_eq!((p.take, p.samples, p.ready), (vec![0], 3, true));
        assert!(plan::<P>(&unbatched, &[], t0).is_none());
    }
}
