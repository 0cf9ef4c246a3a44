//! Request priorities: `--priority-mix LEVEL:WEIGHT,...` gives each request Triton's
//! `priority` request parameter, the levels interleaved in proportion to their weights.
//!
//! The interleaving is a smooth weighted round robin: deterministic, periodic with
//! period `sum(weights)` (after dividing the weights by their common factor), each
//! level exactly at its share over every period and within one request of it in any
//! prefix (always for two levels, checked by the tests for more), so `1:1` alternates
//! `1, 2, 1, 2, ...`. Requests are numbered by the run (open loop:
//! by their place in the schedule; closed loop: in the order they are sent) and the
//! n-th request takes the n-th level of the sequence.

use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::{InferParameter, ModelInferRequest};

/// The request parameter Triton reads a request's priority from.
pub const PRIORITY_PARAMETER: &str = "priority";

/// The longest interleaving cycle (the sum of the weights after dividing them by their
/// common factor): enough for any ratio a person writes, small enough to precompute.
pub const MAX_CYCLE: u64 = 10_000;

/// One priority level and its share of the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Triton priority, 1 the highest (0, the model's default, is not a level).
    pub level: u64,
    pub weight: u64,
}

/// Priority levels with weights, and the order requests take them in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityMix {
    shares: Vec<Share>,
    /// One period of the interleaving: indices into `shares`.
    cycle: Vec<usize>,
}

impl PriorityMix {
    /// A mix of these shares, in this order (levels distinct, at least 1; weights above 0).
    pub fn new(shares: Vec<Share>) -> Result<PriorityMix> {
        ensure!(
            !shares.is_empty(),
            "a priority mix needs at least one LEVEL:WEIGHT pair"
        );
        for (i, s) in shares.iter().enumerate() {
            ensure!(
                s.level >= 1,
                "priority levels start at 1 (0 is the model's default priority), got {}",
                s.level
            );
            ensure!(
                s.weight > 0,
                "the weight of priority {} must be above 0",
                s.level
            );
            ensure!(
                shares[..i].iter().all(|t| t.level != s.level),
                "priority {} appears more than once in the mix",
                s.level
            );
        }
        let common = shares.iter().map(|s| s.weight).fold(0, gcd);
        let weights: Vec<u64> = shares.iter().map(|s| s.weight / common).collect();
        let period = weights
            .iter()
            .try_fold(0_u64, |sum, w| sum.checked_add(*w))
            .filter(|p| *p <= MAX_CYCLE)
            .with_context(|| {
                format!(
                    "the priority weights, divided by their common factor, must add up to at most {MAX_CYCLE}; give the ratio in smaller numbers"
                )
            })?;
        Ok(PriorityMix {
            cycle: smooth_round_robin(&weights, period),
            shares,
        })
    }

    /// The shares, in the order they were given.
    pub fn shares(&self) -> &[Share] {
        &self.shares
    }

    /// The levels, in the order they were given.
    pub fn levels(&self) -> impl Iterator<Item = u64> + '_ {
        self.shares.iter().map(|s| s.level)
    }

    /// Which share (an index into [`PriorityMix::shares`]) the n-th request (from 0) takes.
    pub fn slot(&self, n: u64) -> usize {
        let len = u64::try_from(self.cycle.len()).expect("the cycle is at most MAX_CYCLE long");
        let at = usize::try_from(n % len).expect("below MAX_CYCLE");
        self.cycle[at]
    }
}

/// One period of smooth weighted round robin: each step adds every weight to its
/// counter and picks the largest counter (the first of equals), which then loses the
/// period. After `period` steps every counter is back at 0.
fn smooth_round_robin(weights: &[u64], period: u64) -> Vec<usize> {
    let period_i = i64::try_from(period).expect("the period is at most MAX_CYCLE");
    let mut current = vec![0_i64; weights.len()];
    (0..period)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(weights) {
                *c += i64::try_from(*w).expect("weights are at most the period");
            }
            let pick = (0..current.len())
                .rev()
                .max_by_key(|&i| current[i])
                .expect("a mix has at least one share");
            current[pick] -= period_i;
            pick
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl FromStr for PriorityMix {
    type Err = anyhow::Error;

    /// Parses `LEVEL:WEIGHT,...`, e.g. `1:1,2:3`.
    fn from_str(s: &str) -> Result<PriorityMix> {
        if s.trim().is_empty() {
            bail!("a priority mix needs at least one LEVEL:WEIGHT pair, e.g. 1:1,2:1");
        }
        let shares = s
            .split(',')
            .map(|part| {
                let Some((level, weight)) = part.split_once(':') else {
                    bail!("expected LEVEL:WEIGHT in the priority mix, got {part:?}");
                };
                let number = |text: &str, what: &str| {
                    text.trim().parse::<u64>().map_err(|_| {
                        anyhow::anyhow!(
                            "invalid priority {what} {text:?} in {part:?}: expected a whole number"
                        )
                    })
                };
                Ok(Share {
                    level: number(level, "level")?,
                    weight: number(weight, "weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        PriorityMix::new(shares)
    }
}

impl<'de> Deserialize<'de> for PriorityMix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PriorityMix, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// A copy of `request` that asks for priority `level`.
pub fn with_priority(request: &ModelInferRequest, level: u64) -> ModelInferRequest {
    let mut request = request.clone();
    request.parameters.insert(
        PRIORITY_PARAMETER.to_owned(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Uint64Param(level)),
        },
    );
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(s: &str) -> PriorityMix {
        s.parse().unwrap()
    }

    fn error(s: &str) -> String {
        format!("{:#}", s.parse::<PriorityMix>().unwrap_err())
    }

    fn levels(m: &PriorityMix, n: u64) -> Vec<u64> {
        (0..n).map(|i| m.shares()[m.slot(i)].level).collect()
    }

    #[test]
    fn mixes_parse_in_order() {
        let m = mix("1:1, 2:3");
        assert_eq!(
            m.shares(),
            [
                Share {
                    level: 1,
                    weight: 1
                },
                Share {
                    level: 2,
                    weight: 3
                }
            ]
        );
        assert_eq!(m.levels().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(mix("3:5").levels().collect::<Vec<_>>(), [3]);
        // Large but reducible weights are fine: 5000:5000 is 1:1.
        assert_eq!(levels(&mix("1:5000,2:5000"), 4), [1, 2, 1, 2]);
    }

    #[test]
    fn bad_mixes_are_rejected_with_precise_errors() {
        for (input, expected) in [
            ("", "at least one LEVEL:WEIGHT pair"),
            ("1", "expected LEVEL:WEIGHT in the priority mix, got \"1\""),
            (
                "1:1,",
                "expected LEVEL:WEIGHT in the priority mix, got \"\"",
            ),
            (
                "1:1;2:1",
                "invalid priority weight \"1;2:1\" in \"1:1;2:1\"",
            ),
            ("x:1", "invalid priority level \"x\" in \"x:1\""),
            ("-1:1", "invalid priority level \"-1\""),
            ("1:1.5", "invalid priority weight \"1.5\""),
            ("0:1", "priority levels start at 1"),
            ("1:0", "the weight of priority 1 must be above 0"),
            ("1:1,2:1,1:2", "priority 1 appears more than once"),
            ("1:9999,2:2", "must add up to at most 10000"),
            ("1:18446744073709551615,2:1", "must add up to at most 10000"),
        ] {
            let e = error(input);
            assert!(e.contains(expected), "{input:?}: {e}");
        }
    }

    #[test]
    fn equal_weights_alternate() {
        let m = mix("1:1,2:1");
        assert_eq!(levels(&m, 6), [1, 2, 1, 2, 1, 2]);
        // Whatever the first request: any run of consecutive requests is split ±1.
        for start in 0..4 {
            for len in 0..9 {
                let ones = (start..start + len)
                    .filter(|&n| m.shares()[m.slot(n)].level == 1)
                    .count() as u64;
                assert!(ones.abs_diff(len - ones) <= 1, "{start}+{len}");
            }
        }
    }

    #[test]
    fn every_prefix_is_within_one_request_of_its_share() {
        for input in ["1:3,2:1", "1:1,2:2,3:7", "5:2,1:3,2:5,4:1", "1:97,2:3"] {
            let m = mix(input);
            let total: u64 = m.shares().iter().map(|s| s.weight).sum();
            let mut counts = vec![0_u64; m.shares().len()];
            // Three periods: the sequence repeats exactly.
            for n in 0..3 * total {
                counts[m.slot(n)] += 1;
                for (count, share) in counts.iter().zip(m.shares()) {
                    let exact = (n + 1) as f64 * share.weight as f64 / total as f64;
                    assert!(
                        (*count as f64 - exact).abs() < 1.0,
                        "{input}: after {} requests level {} has {count}, exactly {exact}",
                        n + 1,
                        share.level
                    );
                }
            }
            let shares: Vec<u64> = m.shares().iter().map(|s| 3 * s.weight).collect();
            assert_eq!(counts, shares, "{input}: exact over whole periods");
        }
        assert_eq!(levels(&mix("1:3,2:1"), 8), [1, 1, 2, 1, 1, 1, 2, 1]);
    }

    #[test]
    fn requests_carry_the_priority_as_uint64() {
        let base = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        };
        assert!(base.parameters.is_empty());
        let high = with_priority(&base, 2);
        assert_eq!(high.parameters.len(), 1);
        assert_eq!(
            high.parameters["priority"].parameter_choice,
            Some(ParameterChoice::Uint64Param(2))
        );
        assert_eq!(high.model_name, "m");
    }
}
