//! When open-loop requests are meant to be sent: a rate profile `rate(t)` and the
//! intended send times drawn from it.
//!
//! Everything here is pure: the same profile, arrival process and seed always give
//! the same times, so the schedule is unit-tested without a runtime and a run can be
//! repeated exactly. Latency in open loop is measured from these intended times,
//! never from the moment a request actually left, so a generator or server that
//! stalls cannot hide its stall (no coordinated omission).

use std::time::Duration;

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How requests are spread in time at a given rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced: one request every `1 / rate` seconds.
    Constant,
    /// A Poisson process: exponential gaps with mean `1 / rate`, like many
    /// independent clients.
    #[default]
    Poisson,
}

/// One stretch of a profile with a constant rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// Requests per second during the stage (0 means silence).
    pub rate: f64,
    /// How long the stage lasts.
    #[serde(with = "duration_secs")]
    pub duration: Duration,
}

/// A piecewise-constant offered rate over time: steady, steps up and down, spikes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    stages: Vec<Stage>,
}

impl Profile {
    /// Stages played one after the other.
    pub fn steps(stages: Vec<Stage>) -> Result<Profile> {
        ensure!(
            !stages.is_empty(),
            "a load profile needs at least one stage"
        );
        for s in &stages {
            ensure!(
                s.rate.is_finite() && s.rate >= 0.0,
                "a stage rate must be a finite number >= 0, got {}",
                s.rate
            );
            ensure!(!s.duration.is_zero(), "a stage must last longer than 0 s");
        }
        Ok(Profile { stages })
    }

    /// One rate for the whole run.
    pub fn steady(rate: f64, duration: Duration) -> Result<Profile> {
        Profile::steps(vec![Stage { rate, duration }])
    }

    /// `base` rate, jumping to `peak` from `at` for `length`, then `base` again until `total`.
    pub fn spike(spike: &Spike) -> Result<Profile> {
        let after = spike.at + spike.length;
        ensure!(
            after < spike.total,
            "the spike ({:?} + {:?}) must end before the run does ({:?})",
            spike.at,
            spike.length,
            spike.total
        );
        let mut stages = Vec::with_capacity(3);
        if !spike.at.is_zero() {
            stages.push(Stage {
                rate: spike.base,
                duration: spike.at,
            });
        }
        stages.push(Stage {
            rate: spike.peak,
            duration: spike.length,
        });
        stages.push(Stage {
            rate: spike.base,
            duration: spike.total - after,
        });
        Profile::steps(stages)
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Length of the whole profile.
    pub fn duration(&self) -> Duration {
        self.stages.iter().map(|s| s.duration).sum()
    }

    /// The offered rate at `t` after the start (0 after the end).
    pub fn rate_at(&self, t: Duration) -> f64 {
        let mut end = Duration::ZERO;
        for s in &self.stages {
            end += s.duration;
            if t < end {
                return s.rate;
            }
        }
        0.0
    }

    /// How many requests the profile offers on average.
    pub fn expected_requests(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| s.rate * s.duration.as_secs_f64())
            .sum()
    }

    /// How many requests the profile offers on average in `[from, to)`.
    pub fn expected_between(&self, from: Duration, to: Duration) -> f64 {
        let mut start = Duration::ZERO;
        let mut total = 0.0;
        for s in &self.stages {
            let end = start + s.duration;
            let overlap = end.min(to).saturating_sub(start.max(from));
            total += s.rate * overlap.as_secs_f64();
            start = end;
        }
        total
    }

    /// The highest rate of any stage.
    pub fn peak_rate(&self) -> f64 {
        self.stages.iter().map(|s| s.rate).fold(0.0, f64::max)
    }
}

/// A base rate with one burst: the shape of a traffic spike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spike {
    pub base: f64,
    pub peak: f64,
    /// When the burst starts.
    pub at: Duration,
    /// How long the burst lasts.
    pub length: Duration,
    /// Length of the whole run.
    pub total: Duration,
}

/// Intended send times, as offsets from the start of the run, in increasing order.
///
/// Constant arrivals inside a stage are `stage_start + k / rate` exactly (computed
/// from `k`, so no rounding error accumulates). Poisson arrivals draw exponential
/// gaps; at a stage boundary the process restarts at the boundary with the new
/// rate, which is exact for a Poisson process because it is memoryless.
pub struct Schedule {
    stages: Vec<Stage>,
    arrival: Arrival,
    rng: StdRng,
    /// Index of the current stage.
    stage: usize,
    /// Start of the current stage, in seconds from the start of the run.
    stage_start: f64,
    /// Arrivals already produced in the current stage (constant arrivals).
    k: u64,
    /// Offset of the last Poisson arrival within the current stage, in seconds.
    t: f64,
}

impl Schedule {
    pub fn new(profile: &Profile, arrival: Arrival, seed: u64) -> Schedule {
        Schedule {
            stages: profile.stages.clone(),
            arrival,
            rng: StdRng::seed_from_u64(seed),
            stage: 0,
            stage_start: 0.0,
            k: 0,
            t: 0.0,
        }
    }

    /// The next offset inside the current stage, or `None` when the stage is over.
    fn next_in_stage(&mut self, stage: Stage) -> Option<f64> {
        if stage.rate <= 0.0 {
            return None;
        }
        let offset = match self.arrival {
            Arrival::Constant => self.k as f64 / stage.rate,
            Arrival::Poisson => {
                // Inverse transform of U in (0, 1]: -ln(U) / rate is exponential.
                let u: f64 = 1.0 - self.rng.random::<f64>();
                self.t += -u.ln() / stage.rate;
                self.t
            }
        };
        self.k += 1;
        (offset < stage.duration.as_secs_f64()).then_some(offset)
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        while let Some(&stage) = self.stages.get(self.stage) {
            if let Some(offset) = self.next_in_stage(stage) {
                return Some(Duration::from_secs_f64(self.stage_start + offset));
            }
            self.stage_start += stage.duration.as_secs_f64();
            self.stage += 1;
            self.k = 0;
            self.t = 0.0;
        }
        None
    }
}

/// Serializes a `Duration` as fractional seconds.
pub(crate) mod duration_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn constant_times_are_exact() {
        let profile = Profile::steady(4.0, secs(1.0)).unwrap();
        let times: Vec<_> = Schedule::new(&profile, Arrival::Constant, 0).collect();
        assert_eq!(times, vec![secs(0.0), secs(0.25), secs(0.5), secs(0.75)]);
    }

    #[test]
    fn constant_times_follow_steps() {
        let profile = Profile::steps(vec![
            Stage {
                rate: 2.0,
                duration: secs(1.0),
            },
            Stage {
                rate: 0.0,
                duration: secs(1.0),
            },
            Stage {
                rate: 4.0,
                duration: secs(0.5),
            },
        ])
        .unwrap();
        let times: Vec<_> = Schedule::new(&profile, Arrival::Constant, 0).collect();
        assert_eq!(times, vec![secs(0.0), secs(0.5), secs(2.0), secs(2.25)]);
    }

    #[test]
    fn constant_count_over_long_run_has_no_drift() {
        let profile = Profile::steady(1000.0, secs(10.0)).unwrap();
        let times: Vec<_> = Schedule::new(&profile, Arrival::Constant, 0).collect();
        assert_eq!(times.len(), 10_000);
        assert_eq!(times[9_999], secs(9.999));
    }

    #[test]
    fn poisson_mean_rate_matches_with_fixed_seed() {
        let profile = Profile::steady(500.0, secs(20.0)).unwrap();
        let times: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 42).collect();
        // 10 000 expected; the standard deviation of a Poisson count is 100.
        let n = times.len() as f64;
        assert!((n - 10_000.0).abs() < 300.0, "got {n} arrivals");
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "times must not go backwards"
        );
        assert!(times.iter().all(|t| *t < secs(20.0)));
        // Exponential gaps: the standard deviation equals the mean.
        let gaps: Vec<f64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.002).abs() < 0.0001, "mean gap {mean}");
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.05,
            "coefficient of variation {}",
            var.sqrt() / mean
        );
    }

    #[test]
    fn poisson_is_reproducible_and_seed_dependent() {
        let profile = Profile::steady(100.0, secs(1.0)).unwrap();
        let a: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 7).collect();
        let b: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 7).collect();
        let c: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 8).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn poisson_follows_a_spike() {
        let spike = Spike {
            base: 100.0,
            peak: 1000.0,
            at: secs(4.0),
            length: secs(2.0),
            total: secs(10.0),
        };
        let profile = Profile::spike(&spike).unwrap();
        assert_eq!(profile.duration(), secs(10.0));
        assert_eq!(profile.rate_at(secs(3.9)), 100.0);
        assert_eq!(profile.rate_at(secs(4.0)), 1000.0);
        assert_eq!(profile.rate_at(secs(6.0)), 100.0);
        assert_eq!(profile.rate_at(secs(10.0)), 0.0);
        assert_eq!(profile.expected_requests(), 2800.0);
        assert_eq!(profile.expected_between(secs(3.0), secs(5.0)), 1100.0);
        assert_eq!(profile.expected_between(secs(9.5), secs(20.0)), 50.0);
        let times: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 3).collect();
        let in_spike = times
            .iter()
            .filter(|t| **t >= secs(4.0) && **t < secs(6.0))
            .count();
        // 2000 expected (sd ~45) in the burst, 800 (sd ~28) outside it.
        assert!(
            (1850..2150).contains(&in_spike),
            "{in_spike} arrivals in the spike"
        );
        assert!(
            (650..950).contains(&(times.len() - in_spike)),
            "{} outside",
            times.len() - in_spike
        );
    }

    #[test]
    fn interleaved_shares_partition_the_schedule() {
        let profile = Profile::steady(100.0, secs(1.0)).unwrap();
        let all: Vec<_> = Schedule::new(&profile, Arrival::Poisson, 5).collect();
        let mut shares: Vec<_> = (0..3)
            .flat_map(|k| {
                Schedule::new(&profile, Arrival::Poisson, 5)
                    .skip(k)
                    .step_by(3)
            })
            .collect();
        shares.sort();
        assert_eq!(shares, all);
    }

    #[test]
    fn invalid_profiles_are_rejected() {
        assert!(Profile::steps(vec![]).is_err());
        assert!(Profile::steady(-1.0, secs(1.0)).is_err());
        assert!(Profile::steady(f64::NAN, secs(1.0)).is_err());
        assert!(Profile::steady(1.0, Duration::ZERO).is_err());
        let late = Spike {
            base: 1.0,
            peak: 2.0,
            at: secs(9.0),
            length: secs(2.0),
            total: secs(10.0),
        };
        assert!(Profile::spike(&late).is_err());
    }
}
