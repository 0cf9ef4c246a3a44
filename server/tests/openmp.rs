//! The binary runs libtorch's OpenMP threads with the passive wait policy unless the
//! environment chose one. libgomp prints the settings it started with when
//! `OMP_DISPLAY_ENV=verbose` is set, once per process image: the last block printed is
//! the one the server runs with.

use std::process::Command;

/// The value of `GOMP_SPINCOUNT` in the last settings block libgomp printed.
fn spin_count_in_effect(envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("--version")
        .env_remove("OMP_WAIT_POLICY")
        .env_remove("GOMP_SPINCOUNT")
        .env("OMP_DISPLAY_ENV", "verbose");
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command.output().expect("sluice runs");
    assert!(out.status.success(), "sluice --version failed: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sluice "));
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GOMP_SPINCOUNT = "))
        .next_back()
        .unwrap_or_else(|| panic!("libgomp printed no settings: {stderr}"))
        .trim_matches('\'')
        .to_owned()
}

#[test]
fn idle_openmp_threads_sleep_by_default() {
    assert_eq!(spin_count_in_effect(&[]), "0");
}

#[test]
fn an_operator_choice_of_wait_policy_is_kept() {
    assert_ne!(spin_count_in_effect(&[("OMP_WAIT_POLICY", "ACTIVE")]), "0");
    assert_eq!(spin_count_in_effect(&[("GOMP_SPINCOUNT", "5000")]), "5000");
}
