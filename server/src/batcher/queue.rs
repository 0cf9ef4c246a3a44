//! The model's queue as plain state, tested without a runtime: priority order, shedding
//! a lower level for a preempting request, dropping dead work, fitting a batch to its
//! deadlines, and the counters that admission reads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::Queued;
use crate::error::Error;
use crate::error::RejectReason;
use crate::metrics::{self, DropReason};
use crate::work::ComputeEstimate;

/// What waits in the queue: requests in total, samples per priority level. Shared with
/// the [`Batcher`](super::Batcher) handle, which counts a request in before sending it.
pub(super) struct QueueCounts {
    pub(super) requests: AtomicUsize,
    /// Index: priority level (0 unused).
    samples: Box<[AtomicUsize]>,
}

impl QueueCounts {
    pub(super) fn new(levels: u32) -> QueueCounts {
        QueueCounts {
            requests: AtomicUsize::new(0),
            samples: (0..=levels.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Samples that would be dispatched before a new request of `level`.
    pub(super) fn ahead_of(&self, level: u32) -> usize {
        self.samples
            .iter()
            .take(level as usize + 1)
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }

    pub(super) fn add(&self, q: &Queued) {
        self.samples[q.priority as usize].fetch_add(q.samples, Ordering::AcqRel);
    }

    pub(super) fn remove(&self, q: &Queued) {
        self.samples[q.priority as usize].fetch_sub(q.samples, Ordering::AcqRel);
    }
}

/// The requests waiting for an instance, highest priority first and, within a level,
/// oldest first. Every request that leaves is accounted for in the shared counts.
pub(super) struct Queue {
    model: String,
    items: VecDeque<Queued>,
    counts: Arc<QueueCounts>,
}

impl Queue {
    pub(super) fn new(model: String, counts: Arc<QueueCounts>) -> Queue {
        Queue {
            model,
            items: VecDeque::new(),
            counts,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.items.iter()
    }

    /// The queue as one slice, for [`plan`](super::plan).
    pub(super) fn as_slice(&mut self) -> &[Queued] {
        self.items.make_contiguous()
    }

    /// The earliest moment a queued request expires or reaches its deadline.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.items
            .iter()
            .flat_map(|q| [q.expires, q.deadline])
            .flatten()
            .min()
    }

    /// Queue in priority order: after every request of the same or a higher level
    /// (lower number), so within a level the oldest goes first. A preempting request
    /// sheds the newest request of a lower level.
    pub(super) fn push(&mut self, q: Queued) {
        let (level, preempt) = (q.priority, q.preempt);
        let at = self
            .items
            .iter()
            .rposition(|other| other.priority <= q.priority)
            .map_or(0, |i| i + 1);
        self.items.insert(at, q);
        if preempt {
            self.shed_below(level);
        }
    }

    /// Make room for a request of `level`: answer the newest queued request of the
    /// lowest level below it UNAVAILABLE (the queue's tail, as it is kept in priority
    /// order). Nothing is shed when every lower-level request is already running.
    fn shed_below(&mut self, level: u32) {
        if self.items.back().is_none_or(|q| q.priority <= level) {
            return;
        }
        let shed = self.items.pop_back().expect("checked above");
        self.release(std::slice::from_ref(&shed));
        let _ = shed.reply.send(Err(Error::Overloaded {
            model: self.model.clone(),
            cause: RejectReason::Preempted,
            level: Some(shed.priority),
            reason: format!(
                "shed for a priority level {level} request (this one is level {})",
                shed.priority
            ),
            retry_after: crate::limit::LIMIT_PUSHBACK,
        }));
    }

    /// The longest prefix of the planned batch whose execution, as measured so far,
    /// ends before the earliest deadline in it (at least its first request, which fits
    /// alone: [`drop_dead`](Self::drop_dead) has removed those that do not). A batch too
    /// large for its deadlines would fail every request in it; the rest waits for the
    /// next instance.
    pub(super) fn fit_deadlines(
        &self,
        take: &[usize],
        estimate: &ComputeEstimate,
        now: Instant,
    ) -> Vec<usize> {
        let mut samples = 0;
        let mut earliest: Option<Instant> = None;
        let mut fits = 0;
        for (n, &i) in take.iter().enumerate() {
            let q = &self.items[i];
            samples += q.samples;
            earliest = match (earliest, q.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let late = match (earliest, estimate.estimate(samples)) {
                (Some(deadline), Some(run)) => now + run > deadline,
                _ => false,
            };
            if late && n > 0 {
                break;
            }
            fits = n + 1;
        }
        take[..fits].to_vec()
    }

    /// Answer and remove requests that expired, that cannot finish before their
    /// deadline even if dispatched alone now, or whose client left.
    pub(super) fn drop_dead(&mut self, estimate: &ComputeEstimate, now: Instant) {
        let expired = |q: &Queued| {
            q.expires.is_some_and(|e| e <= now)
                || q.deadline
                    .is_some_and(|d| d <= now + estimate.estimate(q.samples).unwrap_or_default())
        };
        let dead = |q: &Queued| {
            if expired(q) {
                Some(DropReason::Expired)
            } else if q.reply.is_closed() {
                Some(DropReason::Cancelled)
            } else {
                None
            }
        };
        if !self.items.iter().any(|q| dead(q).is_some()) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.items.len());
        let mut gone = Vec::new();
        for q in self.items.drain(..) {
            match dead(&q) {
                Some(reason) => gone.push((q, reason)),
                None => kept.push_back(q),
            }
        }
        self.items = kept;
        let (gone, reasons): (Vec<Queued>, Vec<DropReason>) = gone.into_iter().unzip();
        self.release(&gone);
        for (q, reason) in gone.into_iter().zip(reasons) {
            metrics::dropped(&self.model, reason);
            if reason == DropReason::Expired {
                let _ = q.reply.send(Err(Error::DeadlineExceeded {
                    model: self.model.clone(),
                    stage: "waiting in the queue",
                }));
            }
        }
    }

    /// Remove the planned requests (indices into the queue, ascending), in queue order.
    pub(super) fn take(&mut self, take: &[usize]) -> Vec<Queued> {
        let mut batch = Vec::with_capacity(take.len());
        for &i in take.iter().rev() {
            batch.push(
                self.items
                    .remove(i)
                    .expect("planned indices are in the queue"),
            );
        }
        batch.reverse();
        self.release(&batch);
        batch
    }

    /// Answer every queued request UNAVAILABLE with `reason`.
    pub(super) fn fail_all(&mut self, reason: &str) {
        let failed: Vec<Queued> = self.items.drain(..).collect();
        self.release(&failed);
        for q in failed {
            let _ = q.reply.send(Err(Error::ModelUnavailable {
                model: self.model.clone(),
                reason: reason.into(),
            }));
        }
    }

    /// Account for requests leaving the queue.
    fn release(&self, left: &[Queued]) {
        for q in left {
            self.counts.remove(q);
        }
        let n = left.len();
        let remaining = self.counts.requests.fetch_sub(n, Ordering::AcqRel) - n;
        metrics::queue_depth(&self.model, remaining);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::tensor::DataType;
    use crate::work::Done;

    type Answer = oneshot::Receiver<Result<Done, Error>>;

    fn request(priority: u32, arrival: Instant, deadline: Option<Instant>) -> (Queued, Answer) {
        let (reply, answer) = oneshot::channel();
        let q = Queued {
            inputs: Vec::new(),
            samples: 1,
            key: Arc::from(vec![(DataType::Fp32, vec![4])]),
            arrival,
            expires: None,
            deadline,
            priority,
            preempt: false,
            reply,
        };
        (q, answer)
    }

    fn queue(levels: u32) -> (Queue, Arc<QueueCounts>) {
        let counts = Arc::new(QueueCounts::new(levels));
        (Queue::new("m".into(), counts.clone()), counts)
    }

    /// Counted in as the batcher handle does before sending.
    fn push(queue: &mut Queue, counts: &QueueCounts, q: Queued) {
        counts.requests.fetch_add(1, Ordering::AcqRel);
        counts.add(&q);
        queue.push(q);
    }

    fn levels(queue: &Queue) -> Vec<(u32, Instant)> {
        queue.iter().map(|q| (q.priority, q.arrival)).collect()
    }

    #[test]
    fn higher_levels_go_first_and_each_level_in_arrival_order() {
        let (mut queue, counts) = queue(3);
        let t0 = Instant::now();
        let t = |ms| t0 + Duration::from_millis(ms);
        let mut answers = Vec::new();
        for (level, ms) in [(3, 0), (1, 1), (2, 2), (1, 3), (3, 4)] {
            let (q, a) = request(level, t(ms), None);
            answers.push(a);
            push(&mut queue, &counts, q);
        }
        assert_eq!(
            levels(&queue),
            vec![(1, t(1)), (1, t(3)), (2, t(2)), (3, t(0)), (3, t(4))]
        );
        // Two level-1 samples are ahead of a new level-1 request, three of a level-2.
        assert_eq!(
            (counts.ahead_of(1), counts.ahead_of(2), counts.ahead_of(3)),
            (2, 3, 5)
        );
    }

    #[test]
    fn a_preempting_request_sheds_the_newest_lower_level_one() {
        let (mut queue, counts) = queue(2);
        let t0 = Instant::now();
        let (low_old, mut low_old_answer) = request(2, t0, None);
        let (low_new, mut low_new_answer) = request(2, t0 + Duration::from_millis(1), None);
        push(&mut queue, &counts, low_old);
        push(&mut queue, &counts, low_new);
        let (mut high, _high_answer) = request(1, t0 + Duration::from_millis(2), None);
        high.preempt = true;
        push(&mut queue, &counts, high);

        assert_eq!(queue.len(), 2);
        assert_eq!(counts.requests.load(Ordering::Acquire), 2);
        let shed = low_new_answer
            .try_recv()
            .expect("the newest level-2 request is answered");
        let (reason, _) = crate::error::expect_overloaded(shed.expect_err("refused"));
        assert!(reason.contains("priority level 1"), "{reason}");
        assert!(
            low_old_answer.try_recv().is_err(),
            "the older one still waits"
        );

        // The next one sheds the older level-2 request; after that nothing lower is
        // queued and a preempting request sheds nothing.
        for (ms, left) in [(3, 2), (4, 3)] {
            let (mut again, _a) = request(1, t0 + Duration::from_millis(ms), None);
            again.preempt = true;
            push(&mut queue, &counts, again);
            assert_eq!(queue.len(), left);
        }
        assert!(low_old_answer.try_recv().is_ok(), "shed in its turn");
        assert!(queue.iter().all(|q| q.priority == 1));
    }

    #[test]
    fn dead_work_is_answered_and_leaves_the_counts() {
        let (mut queue, counts) = queue(1);
        let now = Instant::now();
        let estimate = ComputeEstimate::new(8);
        estimate.record(1, Duration::from_millis(5));
        // Deadline passed; deadline nearer than one execution; client gone; fine.
        let (past, mut past_answer) = request(1, now, Some(now));
        let (near, mut near_answer) = request(1, now, Some(now + Duration::from_millis(2)));
        let (gone, gone_answer) = request(1, now, None);
        let (fine, mut fine_answer) = request(1, now, Some(now + Duration::from_secs(1)));
        for q in [past, near, gone, fine] {
            push(&mut queue, &counts, q);
        }
        drop(gone_answer);

        queue.drop_dead(&estimate, now);

        assert_eq!(queue.len(), 1);
        assert_eq!(counts.requests.load(Ordering::Acquire), 1);
        assert_eq!(counts.ahead_of(1), 1);
        for answer in [&mut past_answer, &mut near_answer] {
            let err = answer.try_recv().expect("answered").expect_err("expired");
            assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        }
        assert!(
            fine_answer.try_recv().is_err(),
            "the live request is not answered"
        );
    }

    #[test]
    fn a_batch_is_cut_where_its_measured_execution_would_miss_a_deadline() {
        let (mut queue, counts) = queue(1);
        let now = Instant::now();
        let estimate = ComputeEstimate::new(8);
        for samples in 1..=8 {
            estimate.record(samples, Duration::from_millis(10 * samples as u64));
        }
        let ms = |n| Some(now + Duration::from_millis(n));
        let mut answers = Vec::new();
        // Three samples take 30 ms: the third request's 25 ms deadline cuts the batch
        // after the second.
        for deadline in [ms(100), ms(100), ms(25), None] {
            let (q, a) = request(1, now, deadline);
            answers.push(a);
            push(&mut queue, &counts, q);
        }
        assert_eq!(
            queue.fit_deadlines(&[0, 1, 2, 3], &estimate, now),
            vec![0, 1]
        );
        // The first request always goes, even alone past its deadline (it fits by
        // itself, or drop_dead would have removed it).
        assert_eq!(
            queue.fit_deadlines(&[2, 3], &estimate, now + Duration::from_millis(20)),
            vec![2]
        );

        let taken = queue.take(&[0, 2]);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[1].deadline, ms(25), "taken in queue order");
        assert_eq!(counts.requests.load(Ordering::Acquire), 2);
    }

    #[test]
    fn failing_the_queue_answers_everyone_and_empties_the_counts() {
        let (mut queue, counts) = queue(2);
        let now = Instant::now();
        let mut answers = Vec::new();
        for level in [1, 2, 2] {
            let (q, a) = request(level, now, None);
            answers.push(a);
            push(&mut queue, &counts, q);
        }
        queue.fail_all("the last instance stopped");
        assert!(queue.is_empty());
        assert_eq!(
            (counts.requests.load(Ordering::Acquire), counts.ahead_of(2)),
            (0, 0)
        );
        for mut a in answers {
            let err = a.try_recv().expect("answered").expect_err("failed");
            assert!(
                err.to_string().contains("the last instance stopped"),
                "{err}"
            );
        }
    }
}
