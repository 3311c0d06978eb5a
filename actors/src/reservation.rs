//! NVMe reservations: the storage fence of volumes that several machines
//! attach at once (EBS io2 multi-attach), the third fencing layer.
//!
//! The commands and their rules are those of the NVM Express Base
//! Specification (2.0, "Reservations" and the Reservation Register,
//! Acquire, Release and Report commands). A host registers a 64-bit key
//! on a namespace; a registrant acquires a reservation of a type; a
//! registrant preempts the holder by naming the holder's key, which
//! unregisters every registrant with that key and (with Preempt and Abort)
//! aborts their commands in flight. Under a Write Exclusive reservation the
//! device fails every write of a host that is not the holder with the
//! status Reservation Conflict.
//!
//! [`ReservationDevice`] is the device, one call per command: the
//! production one sends the commands through the kernel's NVMe passthrough
//! (`attache-runtime`'s `nvme` module); the simulation's (`SimEbs`) keeps the
//! same state and rules. [`take_fence`] is the one protocol both run: the
//! claimant of epoch `e` registers `e` as its key and takes a Write
//! Exclusive reservation, preempting (and aborting) the holder if the
//! holder's key is lower. Keys are epochs, which the metadata store's
//! compare-and-swap hands out once each, so a key names one claim.

use async_trait::async_trait;

use crate::engine::EngineError;

/// A reservation type (Reservation Acquire and Release, CDW10 bits 15:08 `RTYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ReservationType {
    /// Only the holder writes; anyone reads.
    WriteExclusive = 1,
    /// Only the holder reads or writes.
    ExclusiveAccess = 2,
    /// Registrants write; anyone reads.
    WriteExclusiveRegistrantsOnly = 3,
    /// Only registrants read or write.
    ExclusiveAccessRegistrantsOnly = 4,
    /// Registrants write (every registrant holds the reservation); anyone reads.
    WriteExclusiveAllRegistrants = 5,
    /// Only registrants read or write (every registrant holds it).
    ExclusiveAccessAllRegistrants = 6,
}

impl ReservationType {
    /// The type with code `code` (1..=6); `None` for 0 (no reservation) or
    /// a reserved value.
    pub fn from_code(code: u8) -> Option<Self> {
        use ReservationType::*;
        Some(match code {
            1 => WriteExclusive,
            2 => ExclusiveAccess,
            3 => WriteExclusiveRegistrantsOnly,
            4 => ExclusiveAccessRegistrantsOnly,
            5 => WriteExclusiveAllRegistrants,
            6 => ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Whether every registrant holds a reservation of this type.
    pub fn all_registrants(self) -> bool {
        matches!(self, Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants)
    }

    /// Whether a host that is not the holder may write: a registrant
    /// (`registered`) under the registrants-only and all-registrants types;
    /// nobody under the exclusive types.
    pub fn lets_write(self, registered: bool) -> bool {
        match self {
            Self::WriteExclusive | Self::ExclusiveAccess => false,
            _ => registered,
        }
    }
}

/// Reservation Register action (CDW10 bits 02:00 `RREGA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RegisterAction {
    /// Register `nrkey` (success if this host is registered with it already).
    Register = 0,
    /// Unregister this host (releasing a reservation it holds).
    Unregister = 1,
    /// Replace this host's key with `nrkey` (a holder stays the holder).
    Replace = 2,
}

/// Reservation Acquire action (CDW10 bits 02:00 `RACQA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AcquireAction {
    /// Take a reservation nobody holds.
    Acquire = 0,
    /// Unregister the registrants with key `prkey`, taking the reservation
    /// if its holder is one of them.
    Preempt = 1,
    /// As `Preempt`, and abort the preempted hosts' commands in flight.
    PreemptAndAbort = 2,
}

/// Reservation Release action (CDW10 bits 02:00 `RRELA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReleaseAction {
    /// Release the reservation this host holds.
    Release = 0,
    /// Release any reservation and unregister every registrant.
    Clear = 1,
}

/// One registrant in a Reservation Report (the extended data structure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registrant {
    /// The host's 128-bit Host Identifier.
    pub host_id: u128,
    /// Its reservation key.
    pub key: u64,
    /// Whether it holds the reservation (`RCSTS` bit 0).
    pub holds: bool,
}

/// A Reservation Report: the namespace's reservation state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationStatus {
    /// Bumped by every successful Register, Preempt and Clear (`GEN`).
    pub generation: u32,
    /// The reservation's type; `None` when nobody holds one.
    pub rtype: Option<ReservationType>,
    /// Every registrant.
    pub registrants: Vec<Registrant>,
}

impl ReservationStatus {
    /// The key of the registrant holding the reservation, and its host (for
    /// an all-registrants type, the first holder listed).
    pub fn holder(&self) -> Option<&Registrant> {
        self.rtype?;
        self.registrants.iter().find(|r| r.holds)
    }

    /// The registrant with `key`.
    pub fn registrant(&self, key: u64) -> Option<&Registrant> {
        self.registrants.iter().find(|r| r.key == key)
    }
}

/// How a reservation command failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    /// Status Reservation Conflict (83h): the state does not
    /// allow it (wrong key, another holder, no registrant with `prkey`).
    #[error("reservation conflict: {0}")]
    Conflict(String),
    /// Status Invalid Field in Command (02h), or another command error.
    #[error("reservation command refused: {0}")]
    Refused(String),
    /// The command did not reach the device or its answer was lost.
    #[error("reservation command failed: {0}")]
    Io(String),
}

/// One host's reservation commands on the namespaces of its volumes.
#[async_trait]
pub trait ReservationDevice: Send + Sync {
    /// Reservation Register on `volume`: `action` with current key `crkey`
    /// (ignored with `ignore_existing_key`) and new key `nrkey`.
    async fn register(
        &self,
        volume: &str,
        action: RegisterAction,
        crkey: u64,
        nrkey: u64,
        ignore_existing_key: bool,
    ) -> Result<(), ReservationError>;

    /// Reservation Acquire on `volume`: `action` of type `rtype`, as the
    /// registrant with key `crkey`, preempting key `prkey` (preempt actions only).
    async fn acquire(
        &self,
        volume: &str,
        action: AcquireAction,
        rtype: ReservationType,
        crkey: u64,
        prkey: u64,
    ) -> Result<(), ReservationError>;

    /// Reservation Release on `volume`: `action` of type `rtype` as the
    /// registrant with key `crkey`.
    async fn release(
        &self,
        volume: &str,
        action: ReleaseAction,
        rtype: ReservationType,
        crkey: u64,
    ) -> Result<(), ReservationError>;

    /// Reservation Report on `volume` (extended data structure).
    async fn report(&self, volume: &str) -> Result<ReservationStatus, ReservationError>;
}

/// How many times [`take_fence`] reads the state again after a conflict
/// (another claimant changed it between its report and its command).
pub const TAKE_FENCE_ATTEMPTS: usize = 8;

/// Takes the write fence on `volume` at `epoch` for `device`'s host, as
/// `VolumeProvider::acquire` promises: once this returns, the device fails
/// every other host's writes with Reservation Conflict, and the writes of
/// the host it preempted that were in flight are aborted.
///
/// The protocol, each step one command. A host is known by its key alone
/// (keys are epochs, one claim each), so no step needs its Host Identifier:
/// 1. Report. If any host is registered with a key above `epoch` (the
///    winner of a newer claim registered it), the claim is stale.
/// 2. Register key `epoch`; if this host is registered with another key
///    (a Conflict), Replace it, ignoring the old key (a holder stays the
///    holder).
/// 3. Report again (two registrants with key `epoch` fail the claim: one
///    epoch was handed to two claims); then, if nobody holds a reservation,
///    Acquire a Write Exclusive one; if the holder's key is `k < epoch`,
///    Preempt and Abort `k`; if it is `epoch`, this host holds it (Preempt
///    its own key changes the type to Write Exclusive if it differs).
/// 4. Report once more: the reservation must be Write Exclusive and held
///    by key `epoch` alone ([`verify`]), else the claim fails.
///
/// A Conflict at step 3 (or a second one at step 2) means the state
/// changed since the report (a newer claimant preempted the key this one
/// named, or took the free reservation first): start again, up to
/// [`TAKE_FENCE_ATTEMPTS`] times. Keys only rise: a claimant never preempts
/// a key above its own, and a preempt naming a key that a newer claimant
/// has preempted meanwhile finds no registrant with it and fails.
///
/// One node per machine: hosts are told apart by the device, so two nodes
/// on one machine would be one registrant, and one would never fence the
/// other off.
///
/// Errors: `Fenced` when a registrant has a higher key; `Io` when the
/// device fails, the state kept changing, or the outcome is not the one
/// asked for.
pub async fn take_fence(device: &dyn ReservationDevice, volume: &str, epoch: u64) -> Result<(), EngineError> {
    let io = |e: ReservationError| EngineError::Io(format!("volume {volume}: {e}"));
    let stale = |holder: &Registrant| stale_claim(volume, epoch, holder);
    let mut last = None;
    for _ in 0..TAKE_FENCE_ATTEMPTS {
        let status = device.report(volume).await.map_err(io)?;
        if let Some(newer) = newer_registrant(&status, epoch) {
            return Err(stale(newer));
        }
        let registered = match device.register(volume, RegisterAction::Register, 0, epoch, false).await {
            Err(ReservationError::Conflict(_)) => {
                device.register(volume, RegisterAction::Replace, 0, epoch, true).await
            }
            done => done,
        };
        match registered {
            Ok(()) => {}
            Err(e @ ReservationError::Conflict(_)) => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(io(e)),
        }
        let status = device.report(volume).await.map_err(io)?;
        // Two registrants with this claim's key: two claims were handed
        // one epoch. The device would refuse whichever does not hold; give
        // the claim up rather than believe it holds.
        if status.registrants.iter().filter(|r| r.key == epoch).count() > 1 {
            return Err(EngineError::Io(format!(
                "volume {volume}: two hosts registered key {epoch}: epochs must name one claim each"
            )));
        }
        let we = ReservationType::WriteExclusive;
        let taken = match status.holder() {
            Some(holder) if holder.key > epoch => return Err(stale(holder)),
            Some(holder) if holder.key == epoch && status.rtype == Some(we) => {
                return verify(device, volume, epoch).await
            }
            // Another holder, or this host under another type (preempting
            // its own key changes the type).
            Some(holder) => device.acquire(volume, AcquireAction::PreemptAndAbort, we, epoch, holder.key).await,
            None => device.acquire(volume, AcquireAction::Acquire, we, epoch, 0).await,
        };
        match taken {
            Ok(()) => return verify(device, volume, epoch).await,
            Err(e @ ReservationError::Conflict(_)) => last = Some(e),
            Err(e) => return Err(io(e)),
        }
    }
    Err(EngineError::Io(format!(
        "volume {volume}: the reservation kept changing while epoch {epoch} was taking it ({TAKE_FENCE_ATTEMPTS} \
         attempts; last: {}); retry",
        last.map_or_else(|| "none".to_string(), |e| e.to_string())
    )))
}

/// The registrant with the highest key above `epoch`, if any: the winner of
/// a newer claim registered it, so a claim at `epoch` is stale.
fn newer_registrant(status: &ReservationStatus, epoch: u64) -> Option<&Registrant> {
    status.registrants.iter().filter(|r| r.key > epoch).max_by_key(|r| r.key)
}

/// `Fenced`: `volume`'s registrant `newer` holds a key above this claim's `epoch`.
fn stale_claim(volume: &str, epoch: u64, newer: &Registrant) -> EngineError {
    EngineError::Fenced(format!(
        "volume {volume} has a registrant with key {} (host {:032x}) > this claim's epoch {epoch}",
        newer.key, newer.host_id
    ))
}

/// The last step of [`take_fence`]: a Report showing that the registrant
/// with key `epoch` alone holds a Write Exclusive reservation (and no key
/// is higher). Fails closed on anything else: a reservation of another type
/// left by some other tool, say, where a preempt does not take it over.
///
/// Errors: `Fenced` for a higher key; `Io` otherwise.
async fn verify(device: &dyn ReservationDevice, volume: &str, epoch: u64) -> Result<(), EngineError> {
    let status = device.report(volume).await.map_err(|e| EngineError::Io(format!("volume {volume}: {e}")))?;
    if let Some(newer) = newer_registrant(&status, epoch) {
        return Err(stale_claim(volume, epoch, newer));
    }
    let holders: Vec<u64> = status.registrants.iter().filter(|r| r.holds).map(|r| r.key).collect();
    if status.rtype == Some(ReservationType::WriteExclusive) && holders == [epoch] {
        return Ok(());
    }
    Err(EngineError::Io(format!(
        "volume {volume}: after taking the fence at epoch {epoch} the reservation is {:?} held by keys {holders:?}, \
         not Write Exclusive held by {epoch} alone",
        status.rtype
    )))
}
