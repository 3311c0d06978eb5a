//! NVMe reservation commands through the Linux kernel's NVMe passthrough
//! (`NVME_IOCTL_IO_CMD` on a namespace's block device, `/dev/nvmeXnY`): the
//! production [`ReservationDevice`] for volumes that are NVMe namespaces
//! (EBS io2 multi-attach volumes on Nitro instances).
//!
//! The commands are encoded as the NVM Express Base Specification 2.0
//! lays them out (NVM command set I/O commands):
//!
//! | command               | opcode | CDW10                                              | data (host to controller / back)             |
//! |-----------------------|--------|----------------------------------------------------|----------------------------------------------|
//! | Reservation Register  | 0Dh    | 02:00 RREGA, 03 IEKEY, 31:30 CPTPL                 | 16 bytes: CRKEY 07:00, NRKEY 15:08           |
//! | Reservation Report    | 0Eh    | NUMD, dwords to return minus one; CDW11 bit 0 EDS  | back: the reservation status data structure  |
//! | Reservation Acquire   | 11h    | 02:00 RACQA, 03 IEKEY, 15:08 RTYPE                 | 16 bytes: CRKEY 07:00, PRKEY 15:08           |
//! | Reservation Release   | 15h    | 02:00 RRELA, 03 IEKEY, 15:08 RTYPE                 | 8 bytes: CRKEY 07:00                         |
//!
//! All fields little-endian. The extended reservation status (EDS = 1)
//! is a 64-byte header (GEN 03:00, RTYPE 04, REGCTL 06:05, PTPLS 09) then
//! one 64-byte registered controller data structure per registrant
//! (CNTLID 01:00, RCSTS 02 with bit 0 "holds the reservation", RKEY 15:08,
//! HOSTID 31:16, a 128-bit host identifier). A command that failed with an
//! NVMe status makes the ioctl return that status (status code type in bits
//! 10:08, status code in 07:00); Reservation Conflict is status 83h of
//! status code type 0 (the NVM command set's range; 18h there is Host
//! Identifier Inconsistent Format).
//!
//! Registrations persist through power loss (CPTPL = 11b on Register), so
//! a host that restarts finds its key where it left it.

use std::path::PathBuf;

use async_trait::async_trait;
use attache_actors::reservation::{
    AcquireAction, RegisterAction, Registrant, ReleaseAction, ReservationDevice, ReservationError, ReservationStatus,
    ReservationType,
};

/// Reservation Register opcode.
pub const OPC_RESV_REGISTER: u8 = 0x0D;
/// Reservation Report opcode.
pub const OPC_RESV_REPORT: u8 = 0x0E;
/// Reservation Acquire opcode.
pub const OPC_RESV_ACQUIRE: u8 = 0x11;
/// Reservation Release opcode.
pub const OPC_RESV_RELEASE: u8 = 0x15;
/// Status code (type 0, NVM command set range): Reservation Conflict.
pub const SC_RESERVATION_CONFLICT: u16 = 0x83;
/// Bytes of a Reservation Report this module asks for: the header and up
/// to 31 registrants (io2 allows 16 attachments).
pub const REPORT_BYTES: usize = 64 * 32;

/// One NVMe command as the passthrough takes it: the opcode, CDW10, CDW11
/// and the data buffer (sent, or filled by the controller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The opcode.
    pub opcode: u8,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// The data: sent to the controller, or (for Report) the buffer it fills.
    pub data: Vec<u8>,
}

fn keys(a: u64, b: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(16);
    data.extend_from_slice(&a.to_le_bytes());
    data.extend_from_slice(&b.to_le_bytes());
    data
}

/// Reservation Register: `action` with keys `crkey` → `nrkey`, registrations
/// persisting through power loss (CPTPL 11b).
pub fn register(action: RegisterAction, crkey: u64, nrkey: u64, ignore_existing_key: bool) -> Command {
    let cdw10 = action as u32 | (u32::from(ignore_existing_key) << 3) | (0b11 << 30);
    Command { opcode: OPC_RESV_REGISTER, cdw10, cdw11: 0, data: keys(crkey, nrkey) }
}

/// Reservation Acquire: `action` of type `rtype` as key `crkey`, preempting `prkey`.
pub fn acquire(action: AcquireAction, rtype: ReservationType, crkey: u64, prkey: u64) -> Command {
    let cdw10 = action as u32 | ((rtype as u32) << 8);
    Command { opcode: OPC_RESV_ACQUIRE, cdw10, cdw11: 0, data: keys(crkey, prkey) }
}

/// Reservation Release: `action` of type `rtype` as key `crkey`.
pub fn release(action: ReleaseAction, rtype: ReservationType, crkey: u64) -> Command {
    let cdw10 = action as u32 | ((rtype as u32) << 8);
    Command { opcode: OPC_RESV_RELEASE, cdw10, cdw11: 0, data: crkey.to_le_bytes().to_vec() }
}

/// Reservation Report of `bytes` bytes (a multiple of 4, at least 64),
/// extended data structure.
pub fn report(bytes: usize) -> Command {
    assert!(bytes >= 64 && bytes & 0b11 == 0, "a report buffer holds whole dwords and the 64-byte header");
    Command { opcode: OPC_RESV_REPORT, cdw10: (bytes / 4 - 1) as u32, cdw11: 1, data: vec![0; bytes] }
}

/// Decodes an extended Reservation Report (see the module docs).
/// Errors: `Refused` for a buffer shorter than its header, a reserved
/// reservation type, or more registrants than the buffer holds (nothing is
/// decided on part of the registrants).
pub fn parse_report(data: &[u8]) -> Result<ReservationStatus, ReservationError> {
    if data.len() < 64 {
        return Err(ReservationError::Refused(format!("a reservation report of {} bytes has no header", data.len())));
    }
    let generation = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let rtype = match data[4] {
        0 => None,
        code => Some(
            ReservationType::from_code(code)
                .ok_or_else(|| ReservationError::Refused(format!("reservation report names type {code}")))?,
        ),
    };
    let count = u16::from_le_bytes([data[5], data[6]]) as usize;
    let room = (data.len() - 64) / 64;
    if count > room {
        return Err(ReservationError::Refused(format!(
            "the reservation report lists {count} registrants, more than its buffer holds ({room})"
        )));
    }
    let registrants = data[64..]
        .chunks_exact(64)
        .take(count)
        // (HOSTID as the 16 bytes read little-endian: only shown in messages.)
        .map(|d| Registrant {
            holds: d[2] & 1 == 1,
            key: u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")),
            host_id: u128::from_le_bytes(d[16..32].try_into().expect("16 bytes")),
        })
        .collect();
    Ok(ReservationStatus { generation, rtype, registrants })
}

/// The kernel's `struct nvme_passthru_cmd` (`include/uapi/linux/nvme_ioctl.h`), 72 bytes.
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

/// `_IO('N', 0x40)`: the namespace id of a namespace block device.
const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;
/// `_IOWR('N', 0x43, struct nvme_passthru_cmd)`.
const NVME_IOCTL_IO_CMD: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PassthruCmd>() as libc::c_ulong) << 16) | (0x4E << 8) | 0x43;
/// How long the controller may take over one reservation command, ms.
const COMMAND_TIMEOUT_MS: u32 = 10_000;

fn ioctl_namespace_id(fd: std::os::fd::RawFd, path: &std::path::Path) -> Result<u32, ReservationError> {
    // SAFETY: an ioctl without arguments on a descriptor the caller owns.
    let nsid = unsafe { libc::ioctl(fd, NVME_IOCTL_ID as _) };
    if nsid < 0 {
        let e = std::io::Error::last_os_error();
        return Err(ReservationError::Io(format!("{} is not an NVMe namespace: {e}", path.display())));
    }
    Ok(nsid as u32)
}

/// The NVMe namespace id of the block device `path`.
/// Errors: `Io` when it cannot be opened or is not an NVMe namespace.
pub fn namespace_id(path: &std::path::Path) -> Result<u32, ReservationError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|e| ReservationError::Io(format!("{}: {e}", path.display())))?;
    ioctl_namespace_id(file.as_raw_fd(), path)
}

/// Sends `cmd` to the namespace block device `path`; the filled buffer
/// comes back in `cmd.data` (Report).
fn submit(path: &std::path::Path, cmd: &mut Command) -> Result<(), ReservationError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ReservationError::Io(format!("{}: {e}", path.display())))?;
    let fd = file.as_raw_fd();
    let nsid = ioctl_namespace_id(fd, path)?;
    let mut raw = PassthruCmd {
        opcode: cmd.opcode,
        nsid,
        addr: cmd.data.as_mut_ptr() as u64,
        data_len: cmd.data.len() as u32,
        cdw10: cmd.cdw10,
        cdw11: cmd.cdw11,
        timeout_ms: COMMAND_TIMEOUT_MS,
        ..PassthruCmd::default()
    };
    // SAFETY: `raw` is the kernel's layout; its buffer is `cmd.data`, alive
    // and of `data_len` bytes for the call's duration.
    let rc = unsafe { libc::ioctl(fd, NVME_IOCTL_IO_CMD as _, &mut raw as *mut PassthruCmd) };
    match rc {
        0 => Ok(()),
        rc if rc < 0 => {
            let e = std::io::Error::last_os_error();
            Err(ReservationError::Io(format!("{}: opcode {:#04x}: {e}", path.display(), cmd.opcode)))
        }
        status => Err(status_error(status as u16, cmd.opcode)),
    }
}

/// The error an NVMe completion status (as the passthrough answers it) means.
pub fn status_error(status: u16, opcode: u8) -> ReservationError {
    let (sct, sc) = ((status >> 8) & 0x7, status & 0xFF);
    if sct == 0 && sc == SC_RESERVATION_CONFLICT {
        ReservationError::Conflict(format!("opcode {opcode:#04x} answered Reservation Conflict"))
    } else {
        ReservationError::Refused(format!("opcode {opcode:#04x} answered status type {sct:#x} code {sc:#04x}"))
    }
}

/// Reservation commands on NVMe namespaces, one block device per volume.
#[derive(Clone, Debug)]
pub struct NvmeReservations {
    devices: std::collections::BTreeMap<String, PathBuf>,
}

impl NvmeReservations {
    /// Commands to the namespace devices `devices` (volume id → path).
    pub fn new(devices: std::collections::BTreeMap<String, PathBuf>) -> Self {
        NvmeReservations { devices }
    }

    async fn run(&self, volume: &str, mut cmd: Command) -> Result<Command, ReservationError> {
        let path = self
            .devices
            .get(volume)
            .cloned()
            .ok_or_else(|| ReservationError::Io(format!("no NVMe device is known for volume {volume}")))?;
        tokio::task::spawn_blocking(move || submit(&path, &mut cmd).map(|()| cmd))
            .await
            .map_err(|e| ReservationError::Io(format!("reservation command task failed: {e}")))?
    }
}

#[async_trait]
impl ReservationDevice for NvmeReservations {
    async fn register(
        &self,
        volume: &str,
        action: RegisterAction,
        crkey: u64,
        nrkey: u64,
        ignore_existing_key: bool,
    ) -> Result<(), ReservationError> {
        self.run(volume, register(action, crkey, nrkey, ignore_existing_key)).await.map(drop)
    }

    async fn acquire(
        &self,
        volume: &str,
        action: AcquireAction,
        rtype: ReservationType,
        crkey: u64,
        prkey: u64,
    ) -> Result<(), ReservationError> {
        self.run(volume, acquire(action, rtype, crkey, prkey)).await.map(drop)
    }

    async fn release(
        &self,
        volume: &str,
        action: ReleaseAction,
        rtype: ReservationType,
        crkey: u64,
    ) -> Result<(), ReservationError> {
        self.run(volume, release(action, rtype, crkey)).await.map(drop)
    }

    async fn report(&self, volume: &str) -> Result<ReservationStatus, ReservationError> {
        let done = self.run(volume, report(REPORT_BYTES)).await?;
        parse_report(&done.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's struct and ioctl number, as `nvme_ioctl.h` defines them.
    #[test]
    fn the_passthrough_struct_is_the_kernels() {
        assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
        assert_eq!(std::mem::offset_of!(PassthruCmd, addr), 24);
        assert_eq!(std::mem::offset_of!(PassthruCmd, data_len), 36);
        assert_eq!(std::mem::offset_of!(PassthruCmd, cdw10), 40);
        assert_eq!(std::mem::offset_of!(PassthruCmd, timeout_ms), 64);
        assert_eq!(NVME_IOCTL_IO_CMD, 0xC048_4E43);
    }

    /// Reservation Register: CDW10 RREGA 02:00, IEKEY 03, CPTPL 31:30; data CRKEY then NRKEY.
    #[test]
    fn register_is_encoded_as_the_specification_lays_it_out() {
        let c = register(RegisterAction::Replace, 0x0102_0304_0506_0708, 0x1112_1314_1516_1718, true);
        assert_eq!(c.opcode, 0x0D);
        assert_eq!(c.cdw10, 0b11 << 30 | 1 << 3 | 0b010);
        assert_eq!(
            c.data,
            [0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]
        );
        assert_eq!(register(RegisterAction::Register, 0, 7, false).cdw10, 0xC000_0000);
        assert_eq!(register(RegisterAction::Unregister, 7, 0, false).cdw10, 0xC000_0001);
    }

    /// Reservation Acquire: CDW10 RACQA 02:00, RTYPE 15:08; data CRKEY then PRKEY.
    #[test]
    fn acquire_is_encoded_as_the_specification_lays_it_out() {
        let c = acquire(AcquireAction::PreemptAndAbort, ReservationType::WriteExclusive, 9, 4);
        assert_eq!((c.opcode, c.cdw10, c.cdw11), (0x11, 0x0000_0102, 0));
        assert_eq!(c.data, [9, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
        let c = acquire(AcquireAction::Acquire, ReservationType::ExclusiveAccessAllRegistrants, 1, 0);
        assert_eq!(c.cdw10, 0x0000_0600);
        assert_eq!(acquire(AcquireAction::Preempt, ReservationType::WriteExclusive, 1, 0).cdw10, 0x101);
    }

    /// Reservation Release: CDW10 RRELA 02:00, RTYPE 15:08; data CRKEY (8 bytes).
    #[test]
    fn release_is_encoded_as_the_specification_lays_it_out() {
        let c = release(ReleaseAction::Clear, ReservationType::WriteExclusiveRegistrantsOnly, 0xAB);
        assert_eq!((c.opcode, c.cdw10), (0x15, 0x0000_0301));
        assert_eq!(c.data, [0xAB, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// Reservation Report: NUMD is the dword count minus one; EDS in CDW11 bit 0.
    #[test]
    fn report_asks_for_the_extended_structure() {
        let c = report(REPORT_BYTES);
        assert_eq!((c.opcode, c.cdw10, c.cdw11, c.data.len()), (0x0E, 511, 1, 2048));
    }

    /// A report as a controller fills it: header, then 64-byte registrant entries.
    #[test]
    fn a_report_is_decoded_field_by_field() {
        let mut data = vec![0u8; 64 * 4];
        data[0..4].copy_from_slice(&7u32.to_le_bytes()); // GEN
        data[4] = 1; // RTYPE: Write Exclusive
        data[5..7].copy_from_slice(&2u16.to_le_bytes()); // REGCTL
        let first = &mut data[64..128];
        first[0..2].copy_from_slice(&0xFFFFu16.to_le_bytes()); // CNTLID
        first[2] = 1; // RCSTS: holds
        first[8..16].copy_from_slice(&42u64.to_le_bytes());
        first[16..32].copy_from_slice(&0xA1u128.to_le_bytes());
        let second = &mut data[128..192];
        second[8..16].copy_from_slice(&41u64.to_le_bytes());
        second[16..32].copy_from_slice(&0xB2u128.to_le_bytes());
        let status = parse_report(&data).unwrap();
        assert_eq!(status.generation, 7);
        assert_eq!(status.rtype, Some(ReservationType::WriteExclusive));
        assert_eq!(
            status.registrants,
            vec![
                Registrant { host_id: 0xA1, key: 42, holds: true },
                Registrant { host_id: 0xB2, key: 41, holds: false }
            ]
        );
        assert_eq!(status.holder().map(|h| h.key), Some(42));
        data[4] = 9;
        assert!(matches!(parse_report(&data), Err(ReservationError::Refused(_))), "a reserved type");
        assert!(matches!(parse_report(&data[..63]), Err(ReservationError::Refused(_))));
        data[4] = 1;
        assert!(matches!(parse_report(&data[..128]), Err(ReservationError::Refused(_))), "2 registrants, room for 1");
    }

    /// The passthrough answers an NVMe status: 83h of type 0 is Reservation Conflict.
    #[test]
    fn a_conflict_status_is_a_conflict() {
        assert!(matches!(status_error(0x83, 0x11), ReservationError::Conflict(_)));
        assert!(matches!(status_error(0x4083, 0x11), ReservationError::Conflict(_)), "with the DNR bit");
        assert!(matches!(status_error(0x18, 0x11), ReservationError::Refused(_)), "Host Identifier Inconsistent");
        assert!(matches!(status_error(0x02, 0x11), ReservationError::Refused(_)));
        assert!(matches!(status_error(0x183, 0x11), ReservationError::Refused(_)), "another status type");
    }
}
