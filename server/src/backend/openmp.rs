//! How libtorch's CPU threads wait between parallel regions.
//!
//! The PyTorch builds that sluice links (the PyPI wheels) run their intra-op pool on GNU
//! OpenMP. Unless told otherwise, an OpenMP thread that finishes its share of a parallel
//! region spins for about 300,000 iterations before it sleeps, and a forward is dozens of
//! such regions: at a steady 100 requests/s on the bundled cnn, with two intra-op
//! threads, the server spent ~8.7 ms of CPU per inference, against ~1.7 ms with the
//! threads sleeping at once (`OMP_WAIT_POLICY=PASSIVE`), at the same closed-loop
//! throughput (BENCHMARKS.md, "CPU per inference"). A server spends most of its life
//! between requests, so sleeping is the right default; spinning only pays when forwards
//! run back to back with nothing else wanting the cores.
//!
//! libgomp reads its wait policy once, from the environment, while the process is
//! loaded: before `main` runs, so setting the variable from Rust is too late. The binary
//! therefore re-executes itself once with `OMP_WAIT_POLICY=PASSIVE` when neither that
//! variable nor `GOMP_SPINCOUNT` is set; an operator who sets either keeps their choice.

use std::ffi::OsString;

/// The variable that selects the policy, read by every OpenMP runtime.
pub const WAIT_POLICY: &str = "OMP_WAIT_POLICY";

/// GNU OpenMP's own spin count; setting it is a choice about waiting as well.
pub const SPIN_COUNT: &str = "GOMP_SPINCOUNT";

/// The policy sluice runs with when the operator chose none.
pub const DEFAULT_POLICY: &str = "PASSIVE";

/// `true` when the environment (read through `var`) leaves the wait policy unchosen,
/// so the process should run again with [`DEFAULT_POLICY`].
pub fn needs_default(var: impl Fn(&str) -> Option<OsString>) -> bool {
    var(WAIT_POLICY).is_none() && var(SPIN_COUNT).is_none()
}

/// Re-execute this program with the same arguments and `OMP_WAIT_POLICY=PASSIVE` when
/// the operator chose no wait policy. Returns only when no re-execution is needed (or
/// possible: the error says why, and the process goes on with libgomp's default).
#[cfg(unix)]
pub fn ensure_default_wait_policy() -> Result<(), std::io::Error> {
    use std::os::unix::process::CommandExt;
    if !needs_default(|name| std::env::var_os(name)) {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // exec replaces this process (same PID); it returns only on failure.
    Err(std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(WAIT_POLICY, DEFAULT_POLICY)
        .exec())
}

#[cfg(not(unix))]
pub fn ensure_default_wait_policy() -> Result<(), std::io::Error> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_default_applies_only_when_nothing_is_chosen() {
        assert!(needs_default(env(&[])));
        assert!(needs_default(env(&[("OMP_NUM_THREADS", "4")])));
        assert!(!needs_default(env(&[("OMP_WAIT_POLICY", "ACTIVE")])));
        assert!(!needs_default(env(&[("OMP_WAIT_POLICY", "PASSIVE")])));
        assert!(!needs_default(env(&[("GOMP_SPINCOUNT", "10000")])));
    }
}
