//! A timer for the open-loop dispatcher with the kernel's resolution instead of the
//! runtime's.
//!
//! tokio's timer wheel ticks once a millisecond and rounds every deadline up to the
//! next tick, so a request meant for `t` leaves at the first tick after it: on average
//! half a millisecond late, and up to a whole one. Every such delay counts in the
//! request's latency (measured from its intended time) and is not the server's doing.
//! On Linux the dispatcher instead sleeps on a `timerfd` registered with the same
//! runtime's reactor: it wakes within microseconds of the intended time without a
//! thread of its own or a cross-thread wake-up. Elsewhere, or if the timer cannot be
//! created, it falls back to tokio's timer.

use tokio::time::Instant;

/// Sleeps until an instant, as precisely as the platform allows.
pub struct Pacer {
    #[cfg(target_os = "linux")]
    timer: Option<linux::TimerFd>,
}

impl Pacer {
    /// Must be called within a tokio runtime with IO enabled.
    pub fn new() -> Pacer {
        Pacer {
            #[cfg(target_os = "linux")]
            timer: linux::TimerFd::new().ok(),
        }
    }

    /// Whether sleeps use the kernel's timer (false: tokio's, 1 ms resolution).
    pub fn is_precise(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.timer.is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// Returns at `at` (at once if it has passed). Cancel-safe: dropping the future
    /// before it completes leaves the pacer ready for the next sleep.
    pub async fn sleep_until(&self, at: Instant) {
        #[cfg(target_os = "linux")]
        if let Some(timer) = &self.timer {
            if timer.sleep_until(at).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep_until(at).await;
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    use tokio::time::Instant;

    /// A non-blocking CLOCK_MONOTONIC timerfd on the runtime's reactor.
    pub struct TimerFd {
        fd: AsyncFd<OwnedFd>,
    }

    impl TimerFd {
        pub fn new() -> io::Result<TimerFd> {
            // SAFETY: takes no pointers; the result is checked before use.
            let raw = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: the AsyncFd owns `fd`, so it stays open and the same for the
            // AsyncFd's whole life.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(io::Error::from)?;
            Ok(TimerFd { fd })
        }

        /// Arms the timer for `at` (relative to now: tokio's `Instant` is the
        /// monotonic clock, but its raw value is not exposed) and waits for it.
        pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
            loop {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                self.arm(left)?;
                self.wait().await?;
            }
        }

        /// Sets the timer to fire once, `after` from now. Re-arming replaces an
        /// earlier expiry and clears its count, so a sleep cancelled before it fired
        /// leaves nothing behind.
        fn arm(&self, after: Duration) -> io::Result<()> {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            let spec = libc::itimerspec {
                it_interval: zero,
                it_value: libc::timespec {
                    tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                    // Under 10^9: fits every platform's c_long.
                    tv_nsec: after.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: the descriptor is a valid timerfd owned by `self`, `spec` a valid
            // itimerspec, and the old-value pointer may be null.
            let armed = unsafe {
                libc::timerfd_settime(
                    self.fd.get_ref().as_raw_fd(),
                    0,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
            if armed < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// Waits until the armed timer has fired and consumes its expiry.
        async fn wait(&self) -> io::Result<()> {
            loop {
                let mut ready = self.fd.readable().await?;
                let mut expirations = 0_u64;
                // SAFETY: reads at most 8 bytes into a u64, as timerfd requires.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        (&raw mut expirations).cast::<libc::c_void>(),
                        std::mem::size_of::<u64>(),
                    )
                };
                if n >= 0 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::WouldBlock {
                    return Err(err);
                }
                ready.clear_ready();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sleeps_until_the_instant_and_not_much_past_it() {
        let pacer = Pacer::new();
        assert!(pacer.is_precise(), "timerfd is available on Linux");
        for wait_us in [0_u64, 150, 700, 2_300] {
            let at = Instant::now() + Duration::from_micros(wait_us);
            pacer.sleep_until(at).await;
            assert!(
                Instant::now() >= at,
                "woke before the instant ({wait_us} us)"
            );
        }
    }

    #[tokio::test]
    async fn a_cancelled_sleep_does_not_end_the_next_one_early() {
        let pacer = Pacer::new();
        let early = Instant::now() + Duration::from_millis(1);
        // Cancelled before its expiry is read: the timer fires with nobody waiting.
        let _ = tokio::time::timeout(Duration::from_micros(10), pacer.sleep_until(early)).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let later = Instant::now() + Duration::from_millis(5);
        pacer.sleep_until(later).await;
        assert!(Instant::now() >= later);
    }
}
