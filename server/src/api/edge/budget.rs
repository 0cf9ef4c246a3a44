//! The server-wide budget of request bytes, reserved per message before it is buffered.

use super::*;

/// Bytes are reserved in units of this many (so that the 32-bit permit counts of the
/// semaphore reach any budget); every message costs at least one unit, which also
/// accounts for the fixed cost of a small request.
pub(super) const BUDGET_UNIT: usize = 1024;

/// Reservations up to this size are small: nearly all inference requests (a 224x224x3
/// FP32 image is 600 KB).
pub(super) const SMALL_RESERVATION_BYTES: usize = 1 << 20;

/// The server-wide budget of request bytes being received, decoded or awaiting their
/// answer. Large reservations (over [`SMALL_RESERVATION_BYTES`]) may together take only
/// three quarters of it (or one largest message, if that is more), so clients holding
/// maximum-size messages, stalled or not, cannot shut out the small requests of
/// everyone else: a quarter of the budget stays theirs.
#[derive(Clone)]
pub struct Budget {
    pub(super) units: Arc<Semaphore>,
    pub(super) total_units: usize,
    /// The share large reservations draw from as well.
    pub(super) large: Arc<Semaphore>,
}

impl Budget {
    /// A budget of `bytes`, whose large share still fits a message of `largest` bytes.
    pub fn new(bytes: usize, largest: usize) -> Budget {
        let max_units = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
        let largest_units = largest
            .saturating_add(GRPC_HEADER_BYTES)
            .div_ceil(BUDGET_UNIT);
        // A message of the largest size (and its header) always fits an empty budget.
        let total_units = bytes
            .div_ceil(BUDGET_UNIT)
            .max(largest_units)
            .clamp(1, max_units);
        let large_units = (total_units / 4 * 3).max(largest_units).min(total_units);
        Budget {
            units: Arc::new(Semaphore::new(total_units)),
            total_units,
            large: Arc::new(Semaphore::new(large_units)),
        }
    }

    /// Units that `bytes` (a message and its 5-byte header) cost.
    pub(super) fn units_for(bytes: usize) -> Option<u32> {
        u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1)).ok()
    }

    /// Reserve `bytes` now, or `None` when the budget (or its large share, for a large
    /// reservation) cannot hold them.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reserved> {
        let units = Budget::units_for(bytes)?;
        let large = if bytes > SMALL_RESERVATION_BYTES {
            Some(self.large.clone().try_acquire_many_owned(units).ok()?)
        } else {
            None
        };
        let permit = self.units.clone().try_acquire_many_owned(units).ok()?;
        Some(Reserved {
            _permit: permit,
            _large: large,
        })
    }

    /// Bytes reserved now (in whole units).
    pub fn in_use(&self) -> usize {
        (self.total_units - self.units.available_permits()) * BUDGET_UNIT
    }

    /// Set the bytes-in-flight gauge; called when /metrics is scraped rather than on
    /// every reservation, which would cost each request a metrics lookup.
    pub fn report(&self) {
        metrics::request_bytes_in_flight(self.in_use());
    }
}

/// Bytes held from the budget; given back on drop.
pub struct Reserved {
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) _large: Option<OwnedSemaphorePermit>,
}

/// The reservations of one call's current message (its wire bytes, and the heap its
/// decoding takes), shared by its body (which replaces them message by message), the
/// codec (which adds the decoded heap) and the call's future (which keeps a unary
/// call's until it is answered).
#[derive(Default)]
pub struct Reservation(Mutex<Vec<Reserved>>);

impl Reservation {
    /// Give back what the previous message held; hold `reserved` instead.
    pub(super) fn replace(&self, reserved: Option<Reserved>) {
        let old = std::mem::replace(
            &mut *self.0.lock().expect("never poisoned"),
            reserved.into_iter().collect(),
        );
        drop(old);
    }

    pub(super) fn add(&self, reserved: Reserved) {
        self.0.lock().expect("never poisoned").push(reserved);
    }
}

/// The budget as the codec sees it for one call: the decoded heap of each message is
/// reserved beside its wire bytes, or the call is refused.
pub struct CallBudget {
    pub(super) budget: Budget,
    pub(super) reservation: Arc<Reservation>,
}

impl DecodeBudget for CallBudget {
    fn reserve(&self, bytes: usize) -> Result<(), Status> {
        match self.budget.try_reserve(bytes) {
            Some(reserved) => {
                self.reservation.add(reserved);
                Ok(())
            }
            None => {
                metrics::transport_refusal("grpc", TransportRefusal::BytesInFlight);
                Err(budget_full(format!(
                    "decoding the request takes up to {bytes} bytes"
                )))
            }
        }
    }
}

/// The budget of the call a handler serves, from its request's extensions: streams
/// decode their messages on a task of their own, which sets it as
/// [`DECODE_BUDGET`] around its reads.
#[derive(Clone)]
pub struct CallDecodeBudget(pub Arc<dyn DecodeBudget>);

/// UNAVAILABLE with pushback: the budget of request bytes in flight is full.
pub fn budget_full(what: String) -> Status {
    let mut status = Status::unavailable(format!(
        "server is overloaded: its budget of request bytes in flight is full ({what})"
    ));
    status.metadata_mut().insert(
        RETRY_PUSHBACK_HEADER,
        tonic::metadata::MetadataValue::from(BUDGET_PUSHBACK_MS),
    );
    status
}
