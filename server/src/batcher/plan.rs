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

/// While requests of priority `level` or higher keep arriving, a batch of a lower level
/// takes at most `samples`: it holds an instance that such a request may need next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowerLevelCap {
    pub level: u32,
    pub samples: usize,
}

/// Decide the next batch. `None` when the queue is empty.
pub fn plan<P: Pending>(policy: &BatchPolicy, queue: &[P], now: Instant) -> Option<Plan> {
    plan_capped(policy, queue, now, None)
}

/// [`plan`], with lower-level batches held to `cap` where it applies to the head's level.
// Kept whole: the batching rules in the order they apply (shape, level, size, preferred size, delay).
pub fn plan_capped<P: Pending>(
    policy: &BatchPolicy,
    queue: &[P],
    now: Instant,
    cap: Option<LowerLevelCap>,
) -> Option<Plan> {
    let head = queue.first()?;
    let max = match cap {
        Some(cap) if head.priority() > cap.level => cap.samples.clamp(1, policy.max_batch_size),
        _ => policy.max_batch_size,
    };
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
        // The head always goes (a request is never split, and its own size is within
        // max_batch_size); the rest only as they fit.
        if p.key() != head.key()
            || p.priority() != head.priority()
            || (i > 0 && samples + p.samples() > max)
        {
            continue;
        }
        take.push(i);
        samples += p.samples();
        if samples >= max {
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
        priority: u32,
    }

    impl Pending for P {
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

    fn queue(t0: Instant, items: &[(usize, &[i64], u64)]) -> Vec<P> {
        items
            .iter()
            .map(|&(samples, dims, at_ms)| P {
                samples,
                key: key(dims),
                arrival: t0 + Duration::from_millis(at_ms),
                priority: 1,
            })
            .collect()
    }

    fn at_level(mut q: Vec<P>, level: u32) -> Vec<P> {
        q.iter_mut().for_each(|p| p.priority = level);
        q
    }

    const CAP: Option<LowerLevelCap> = Some(LowerLevelCap {
        level: 1,
        samples: 4,
    });

    #[test]
    fn while_a_higher_level_is_active_a_lower_levels_batch_is_capped() {
        let t0 = Instant::now();
        let q = at_level(queue(t0, &[(1, &[4][..], 0); 10]), 2);
        // Without the cap: all ten (under max_batch_size 32), after the delay.
        let p = plan_capped(&policy(32, &[], 5), &q, t0, None).unwrap();
        assert_eq!((p.take.len(), p.ready), (10, false));
        // With it: four, at once, as a full batch would go.
        let p = plan_capped(&policy(32, &[], 5), &q, t0, CAP).unwrap();
        assert_eq!(p.take, vec![0, 1, 2, 3]);
        assert_eq!((p.samples, p.ready), (4, true));
        // Level 1 itself, or a level at or above the cap's, is not held to it.
        let q = queue(t0, &[(1, &[4][..], 0); 10]);
        let p = plan_capped(&policy(32, &[], 5), &q, t0, CAP).unwrap();
        assert_eq!(p.take.len(), 10);
        let q = at_level(queue(t0, &[(1, &[4][..], 0); 10]), 2);
        let cap = Some(LowerLevelCap {
            level: 2,
            samples: 4,
        });
        assert_eq!(
            plan_capped(&policy(32, &[], 5), &q, t0, cap)
                .unwrap()
                .take
                .len(),
            10
        );
    }

    #[test]
    fn a_lower_level_request_larger_than_the_cap_goes_alone() {
        let t0 = Instant::now();
        let q = at_level(queue(t0, &[(6, &[4], 0), (1, &[4], 0), (2, &[4], 1)]), 2);
        let p = plan_capped(&policy(32, &[], 5), &q, t0, CAP).unwrap();
        assert_eq!(p.take, vec![0]);
        assert_eq!((p.samples, p.ready), (6, true));
        // Smaller ones fill up to the cap and no further.
        let q = at_level(queue(t0, &[(1, &[4], 0), (2, &[4], 0), (2, &[4], 1)]), 2);
        let p = plan_capped(&policy(32, &[], 5), &q, t0, CAP).unwrap();
        assert_eq!(p.take, vec![0, 1]);
        assert_eq!((p.samples, p.ready), (3, false));
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
