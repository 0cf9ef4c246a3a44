//! One typed description of a run, [`RunSpec`], that both the command line and
//! scenario files turn into, and its expansion into points.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use crate::inputs::InputConfig;
use crate::load::{Load, PointConfig};
use crate::priority::PriorityMix;
use crate::schedule::{Arrival, Profile, Stage};
use crate::target::TargetConfig;

/// A duration written for people: `250ms`, `5s`, `1m 30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Human(pub Duration);

impl FromStr for Human {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Human> {
        let d = humantime::parse_duration(s.trim())
            .with_context(|| format!("invalid duration {s:?} (write e.g. 250ms, 5s, 1m)"))?;
        Ok(Human(d))
    }
}

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Human, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// Timing and limits of every point, shared by `run` flags and scenario files.
#[derive(Clone, Debug, PartialEq, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timing {
    /// Measured time of each point (closed loop, open-loop rates), after the warm-up.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub duration: Human,
    /// Time at the start of each point whose requests are not measured.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub warmup: Human,
    /// Per-request deadline, sent as grpc-timeout and enforced by the client; successes
    /// slower than this do not count as goodput.
    #[arg(long, value_name = "DURATION")]
    pub deadline: Option<Human>,
    /// Open loop: most requests outstanding at once; when reached, sends wait and fall
    /// behind schedule (and the run says so).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_in_flight: usize,
    /// Open loop: a send this much behind its intended time counts as late.
    #[arg(long, default_value = "10ms", value_name = "DURATION")]
    pub late_threshold: Human,
    /// After the last send of a point, how long to wait for outstanding answers.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub drain: Human,
    /// Open loop: dispatcher tasks sharing the schedule [default: one per connection].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Seed of the Poisson arrivals and of random input data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            duration: Human(Duration::from_secs(10)),
            warmup: Human(Duration::from_secs(1)),
            deadline: None,
            max_in_flight: 4096,
            late_threshold: Human(Duration::from_millis(10)),
            drain: Human(Duration::from_secs(5)),
            workers: None,
            seed: 1,
        }
    }
}

/// Which load the points of a run apply.
#[derive(Clone, Debug, PartialEq)]
pub enum LoadPlan {
    /// One point per number of concurrent clients.
    Closed { concurrency: Vec<usize> },
    /// One point per steady open-loop rate.
    Open { rates: Vec<f64>, arrival: Arrival },
    /// One point whose rate follows a profile in time.
    Profile { profile: Profile, arrival: Arrival },
}

impl LoadPlan {
    pub fn mode(&self) -> &'static str {
        match self {
            LoadPlan::Closed { .. } => "closed",
            LoadPlan::Open { .. } => "open",
            LoadPlan::Profile { .. } => "profile",
        }
    }
}

/// A whole run, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub name: String,
    pub target: TargetConfig,
    pub inputs: InputConfig,
    pub plan: LoadPlan,
    pub timing: Timing,
    /// Priority levels given to the requests, results broken down per level.
    pub priorities: Option<PriorityMix>,
}

/// Where results go and how the run talks to the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    pub json: Option<PathBuf>,
    /// Plots are written as `<prefix>-sweep.{svg,png}` and `<prefix>-timeline.{svg,png}`.
    pub plots: Option<PathBuf>,
    pub quiet: bool,
    pub font: Option<PathBuf>,
}

/// One point of a run, ready for [`crate::load::run_point`].
#[derive(Clone, Debug, PartialEq)]
pub struct PointPlan {
    pub label: String,
    pub concurrency: Option<usize>,
    pub config: PointConfig,
}

impl PointPlan {
    pub fn profile(&self) -> Option<&Profile> {
        match &self.config.load {
            Load::Open { profile, .. } => Some(profile),
            Load::Closed { .. } => None,
        }
    }
}

impl RunSpec {
    /// Checks what neither clap nor serde can.
    pub fn validate(&self) -> Result<()> {
        let t = &self.timing;
        ensure!(
            !t.duration.0.is_zero(),
            "the duration must be longer than 0 s"
        );
        ensure!(t.max_in_flight > 0, "max_in_flight must be at least 1");
        ensure!(
            t.deadline.is_none_or(|d| !d.0.is_zero()),
            "a deadline must be longer than 0 s"
        );
        ensure!(
            self.inputs.batch_size > 0,
            "the batch size must be at least 1"
        );
        match &self.plan {
            LoadPlan::Closed { concurrency } => {
                ensure!(!concurrency.is_empty(), "give at least one concurrency");
                ensure!(
                    concurrency.iter().all(|c| *c > 0),
                    "a concurrency must be at least 1"
                );
            }
            LoadPlan::Open { rates, .. } => {
                ensure!(!rates.is_empty(), "give at least one rate");
                ensure!(
                    rates.iter().all(|r| r.is_finite() && *r > 0.0),
                    "a rate must be a number above 0"
                );
            }
            LoadPlan::Profile { profile, .. } => ensure!(
                t.warmup.0 < profile.duration(),
                "the warm-up ({:?}) must end before the profile does ({:?})",
                t.warmup.0,
                profile.duration()
            ),
        }
        Ok(())
    }

    /// The points of the run, in order.
    pub fn points(&self) -> Vec<PointPlan> {
        let t = &self.timing;
        let length = t.warmup.0 + t.duration.0;
        let point = |load: Load| PointConfig {
            load,
            warmup: t.warmup.0,
            deadline: t.deadline.map(|d| d.0),
            max_in_flight: t.max_in_flight,
            late_threshold: t.late_threshold.0,
            drain: t.drain.0,
            workers: t.workers.unwrap_or(self.target.connections).max(1),
            seed: t.seed,
            priorities: self.priorities.clone(),
        };
        match &self.plan {
            LoadPlan::Closed { concurrency } => concurrency
                .iter()
                .map(|&c| PointPlan {
                    label: format!("c={c}"),
                    concurrency: Some(c),
                    config: point(Load::Closed {
                        concurrency: c,
                        length,
                    }),
                })
                .collect(),
            LoadPlan::Open { rates, arrival } => rates
                .iter()
                .map(|&rate| PointPlan {
                    label: format!("rate={rate}/s"),
                    concurrency: None,
                    config: point(Load::Open {
                        profile: Profile::steady(rate, length)
                            .expect("rates are validated above 0"),
                        arrival: *arrival,
                    }),
                })
                .collect(),
            LoadPlan::Profile { profile, arrival } => vec![PointPlan {
                label: "profile".to_owned(),
                concurrency: None,
                config: point(Load::Open {
                    profile: profile.clone(),
                    arrival: *arrival,
                }),
            }],
        }
    }
}

/// Parses `RATE@DURATION,...`, e.g. `100@5s,400@2s,100@5s`, into a step profile.
pub fn parse_stages(s: &str) -> Result<Profile> {
    let stages = s
        .split(',')
        .map(|part| {
            let (rate, duration) = part
                .split_once('@')
                .with_context(|| format!("expected RATE@DURATION, got {part:?}"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .with_context(|| format!("invalid rate {rate:?}"))?;
            Ok(Stage {
                rate,
                duration: duration.parse::<Human>()?.0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Profile::steps(stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::DataKind;

    fn spec(plan: LoadPlan) -> RunSpec {
        RunSpec {
            name: "t".into(),
            target: TargetConfig {
                url: "127.0.0.1:1".into(),
                connections: 2,
            },
            inputs: InputConfig {
                model: "m".into(),
                version: String::new(),
                batch_size: 1,
                shapes: vec![],
                data: DataKind::Random,
                file: None,
                seed: 1,
            },
            plan,
            timing: Timing::default(),
            priorities: None,
        }
    }

    #[test]
    fn closed_plan_has_a_point_per_concurrency() {
        let s = spec(LoadPlan::Closed {
            concurrency: vec![1, 4],
        });
        s.validate().unwrap();
        let points = s.points();
        assert_eq!(points.len(), 2);
        assert_eq!(points[1].label, "c=4");
        assert_eq!(
            points[1].config.load,
            Load::Closed {
                concurrency: 4,
                length: Duration::from_secs(11)
            }
        );
        assert_eq!(
            points[1].config.workers, 2,
            "one worker per connection by default"
        );
        assert_eq!(points[1].config.priorities, None);
    }

    #[test]
    fn every_point_carries_the_priority_mix() {
        let mut s = spec(LoadPlan::Open {
            rates: vec![10.0, 20.0],
            arrival: Arrival::Poisson,
        });
        let mix: PriorityMix = "1:1,2:3".parse().unwrap();
        s.priorities = Some(mix.clone());
        assert!(s
            .points()
            .iter()
            .all(|p| p.config.priorities == Some(mix.clone())));
    }

    #[test]
    fn open_plan_runs_steady_rates_over_warmup_and_duration() {
        let s = spec(LoadPlan::Open {
            rates: vec![50.0],
            arrival: Arrival::Constant,
        });
        let p = &s.points()[0];
        assert_eq!(p.label, "rate=50/s");
        assert_eq!(p.profile().unwrap().duration(), Duration::from_secs(11));
        assert_eq!(p.profile().unwrap().rate_at(Duration::from_secs(3)), 50.0);
    }

    #[test]
    fn invalid_plans_are_rejected() {
        assert!(spec(LoadPlan::Closed {
            concurrency: vec![]
        })
        .validate()
        .is_err());
        assert!(spec(LoadPlan::Closed {
            concurrency: vec![0]
        })
        .validate()
        .is_err());
        assert!(spec(LoadPlan::Open {
            rates: vec![0.0],
            arrival: Arrival::Poisson
        })
        .validate()
        .is_err());
        let short = Profile::steady(10.0, Duration::from_millis(500)).unwrap();
        assert!(spec(LoadPlan::Profile {
            profile: short,
            arrival: Arrival::Poisson
        })
        .validate()
        .is_err());
    }

    #[test]
    fn stage_lists_parse() {
        let p = parse_stages("100@5s, 400@500ms,0@1s").unwrap();
        assert_eq!(p.duration(), Duration::from_millis(6500));
        assert_eq!(p.rate_at(Duration::from_millis(5200)), 400.0);
        assert!(parse_stages("100").is_err());
        assert!(parse_stages("x@1s").is_err());
        assert!(parse_stages("1@soon").is_err());
    }
}
