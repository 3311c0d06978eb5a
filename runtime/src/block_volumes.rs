//! `BlockVolumes` (Linux): volumes that are block devices several machines
//! attach at once (EBS io2 multi-attach), each holding an ordinary
//! filesystem (ext4, XFS) that only the volume's primary mounts, at
//! `{volume_root}/{volume}`.
//!
//! - A volume's device is configured (`--volume-devices vol-1=/dev/...`) or,
//!   by default, found by its EBS id as the kernel names EBS NVMe devices:
//!   `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123...` for
//!   `vol-0123...`. A volume is attached when its device exists.
//! - Taking a volume over ([`VolumeProvider::acquire`]), in this order: the
//!   device fence (the NVMe reservation, [`take_fence`], when the volume
//!   fence is `nvme`), then the mount (the filesystem replays its journal;
//!   a device without a filesystem is formatted only with
//!   `format_new_volumes`), then the `EPOCH` file on the mounted filesystem
//!   (as [`LocalVolumes`]), after which the shards open (RocksDB replays
//!   its WAL). Stepping down ([`VolumeProvider::release`]): the shards are
//!   closed by then; unmount. The reservation stays until the next primary
//!   preempts it.
//! - Backups keep the device attached but unmounted: two machines cannot
//!   mount a non-cluster filesystem at once. So backups serve no stale
//!   reads (`backups_read` is `false`); the node answers them with a hint
//!   to the primary.
//! - Shards open only on a mounted volume, so a shard is never created on
//!   the filesystem under an empty mount point.
//!
//! With the volume fence `epoch_file` nothing but the `EPOCH` file and its
//! `flock` fences the volume, which holds only between processes of one
//! machine (tests on loop devices); across machines the fence is `nvme`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use attache_actors::engine::{Engine, EngineError, EngineFactory, OpenMode};
use attache_actors::provider::VolumeProvider;
use attache_actors::reservation::take_fence;

use crate::aws::AwsEbs;
pub use crate::config::VolumeFence;
use crate::files::blocking;
use crate::local_volumes::LocalVolumes;
use crate::nvme::NvmeReservations;

/// The device the kernel names for EBS volume `volume` (NVMe, by id).
pub fn ebs_device(volume: &str) -> PathBuf {
    PathBuf::from(format!("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}", volume.replace('-', "")))
}

/// Block devices as volumes; see the module docs.
pub struct BlockVolumes {
    root: PathBuf,
    devices: BTreeMap<String, PathBuf>,
    format_new: bool,
    nvme: Option<NvmeReservations>,
    local: LocalVolumes,
    /// Per volume, bumped by each `release`; held (a std mutex, inside the
    /// blocking tasks) while a volume is mounted or unmounted, so a claim
    /// abandoned by its caller (a timeout) cannot mount after the release
    /// that followed it.
    terms: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// `--volume-mode aws`: attaches volumes to this instance through EC2.
    ec2: Option<Arc<AwsEbs>>,
}

/// How long `attach` waits for a volume's device to appear once EC2 says
/// the volume is attached (udev makes the by-id link).
pub const DEVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn io(what: impl std::fmt::Display) -> EngineError {
    EngineError::Io(what.to_string())
}

impl BlockVolumes {
    /// Volumes `volumes` mounted under `root`: each on its device in
    /// `devices`, or the EBS device named by its id ([`ebs_device`]);
    /// formatting a device without a filesystem if `format_new`.
    pub fn new(
        root: impl Into<PathBuf>,
        volumes: &[String],
        devices: &BTreeMap<String, PathBuf>,
        format_new: bool,
        fence: VolumeFence,
    ) -> Self {
        let root = root.into();
        let devices: BTreeMap<String, PathBuf> =
            volumes.iter().map(|v| (v.clone(), devices.get(v).cloned().unwrap_or_else(|| ebs_device(v)))).collect();
        let nvme = (fence == VolumeFence::Nvme).then(|| NvmeReservations::new(devices.clone()));
        BlockVolumes {
            local: LocalVolumes::new(root.clone()),
            root,
            devices,
            format_new,
            nvme,
            terms: Arc::default(),
            ec2: None,
        }
    }

    /// The same, their shards sharing `budget` (a node's `memory_budget_bytes`).
    pub fn with_memory_budget(mut self, budget: crate::rocks_engine::MemoryBudget) -> Self {
        self.local = self.local.with_memory_budget(budget);
        self
    }

    /// The same, attaching volumes to this instance through `ec2`
    /// (`--volume-mode aws`).
    pub fn with_ec2(mut self, ec2: Arc<AwsEbs>) -> Self {
        self.ec2 = Some(ec2);
        self
    }

    /// Attaches every volume (through EC2 in aws mode) and waits for its
    /// device: what `attache node` does before [`BlockVolumes::check`].
    ///
    /// Errors: the first volume that cannot be attached, and why.
    pub async fn attach_all(&self) -> anyhow::Result<()> {
        for volume in self.devices.keys() {
            self.attach(volume).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// What the node needs before it starts: root (to mount), each
    /// volume's device present, and an NVMe namespace under the `nvme` fence.
    ///
    /// Errors: a sentence naming what is missing and what to do.
    pub fn check(&self) -> anyhow::Result<()> {
        self.check_host()?;
        let mut seen = BTreeMap::new();
        for (volume, device) in &self.devices {
            anyhow::ensure!(
                !volume.is_empty() && !volume.contains('/') && volume != "." && volume != "..",
                "volume name {volume:?} is not a plain directory name (it names the mount point under the volume root)"
            );
            if let Ok(real) = std::fs::canonicalize(device) {
                if let Some(other) = seen.insert(real.clone(), volume) {
                    anyhow::bail!(
                        "volumes {other} and {volume} are both on {}: give each its own device",
                        real.display()
                    );
                }
            }
            anyhow::ensure!(
                device.exists(),
                "volume {volume}: no block device at {} (attach the volume to this machine, or map it with \
                 --volume-devices {volume}=/dev/...)",
                device.display()
            );
            if self.nvme.is_some() {
                crate::nvme::namespace_id(device).map_err(|e| {
                    anyhow::anyhow!(
                        "volume {volume}: {e}; the nvme volume fence needs an NVMe namespace with reservations \
                         (use --volume-fence epoch-file only for processes on one machine)"
                    )
                })?;
            }
        }
        Ok(())
    }

    /// What the node needs of its machine, before any volume is attached:
    /// root (to mount), and a volume root that is an absolute directory
    /// other than `/`.
    ///
    /// Errors: a sentence naming what is missing.
    pub fn check_host(&self) -> anyhow::Result<()> {
        // SAFETY: geteuid has no preconditions.
        anyhow::ensure!(
            unsafe { libc::geteuid() } == 0,
            "--volume-mode block and aws mount filesystems: run attache node as root"
        );
        anyhow::ensure!(
            self.root != Path::new("/") && self.root.is_absolute(),
            "--volume-mode block and aws need --volume-root, an absolute directory other than / (volumes are \
             mounted under it)"
        );
        Ok(())
    }

    fn mount_point(&self, volume: &str) -> PathBuf {
        self.root.join(volume)
    }

    fn device(&self, volume: &str) -> Result<&PathBuf, EngineError> {
        self.devices.get(volume).ok_or_else(|| io(format!("volume {volume} is not configured on this node")))
    }

    /// Checks that the volume a shard path lies on is mounted here, from its
    /// own device (the mount point's filesystem is the device's).
    fn mounted_volume_of(&self, path: &Path) -> Result<(), EngineError> {
        let volume = self
            .local
            .volume_of(path)
            .ok_or_else(|| io(format!("{} is on no volume under {}", path.display(), self.root.display())))?;
        let (point, device) = (self.mount_point(volume), self.device(volume)?);
        if mounted_from(&point, device).map_err(|e| io(format!("{}: {e}", point.display())))? {
            Ok(())
        } else {
            Err(io(format!(
                "volume {volume} is not mounted at {} from {} on this node",
                point.display(),
                device.display()
            )))
        }
    }
}

/// Whether the filesystem at `point` is `device`'s (`st_dev` of the one is
/// `st_rdev` of the other), so that `point` is not an empty mount point on
/// the root filesystem or another volume.
pub fn mounted_from(point: &Path, device: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let point = match std::fs::metadata(point) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(point.dev() == std::fs::metadata(device)?.rdev())
}

/// What a claim does on the blocking pool once the device fence is taken,
/// under the volume's term lock: refuses if a release came since the claim
/// began (`term`); mounts the device afresh (an old mount at the point is
/// unmounted first: its cached state may predate other machines' writes;
/// under the `nvme` fence a device still open elsewhere on this machine,
/// say a stale mount, is refused, and its buffer cache dropped); then
/// raises the `EPOCH` file; unmounts again if that fails.
struct Claim {
    volume: String,
    epoch: u64,
    term: u64,
    device: PathBuf,
    point: PathBuf,
    format_new: bool,
    exclusive: bool,
    local: LocalVolumes,
    terms: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

impl Claim {
    fn run(self) -> Result<(), EngineError> {
        let terms = self.terms.lock().expect("terms lock");
        if terms.get(&self.volume).copied().unwrap_or(0) != self.term {
            return Err(io(format!("volume {}: the claim was given up before it mounted", self.volume)));
        }
        std::fs::create_dir_all(&self.point).map_err(|e| io(format!("{}: {e}", self.point.display())))?;
        if is_mount_point(&self.point).map_err(|e| io(format!("{}: {e}", self.point.display())))? {
            unmount(&self.point, false)?;
        }
        if self.exclusive {
            drop_cache_exclusive(&self.device)?;
        }
        let fstype = match filesystem_type(&self.device)? {
            Some(t) => t,
            None if self.format_new => {
                run("mkfs.ext4", &["-q", "-F", "-L", &self.volume, &self.device.to_string_lossy()])?;
                "ext4".to_string()
            }
            None => {
                return Err(io(format!(
                    "volume {}: {} holds no filesystem; start the node with --format-new-volumes to create one (ext4)",
                    self.volume,
                    self.device.display()
                )))
            }
        };
        mount(&self.device, &self.point, &fstype)?;
        let raised = self.local.raise_epoch(&self.volume, self.epoch);
        if raised.is_err() {
            let _ = unmount(&self.point, true);
        }
        drop(terms);
        raised
    }
}

/// Opens `device` exclusively (`O_EXCL` on a block device fails with EBUSY
/// while anything on this machine has it mounted) and drops its buffer
/// cache (`BLKFLSBUF`), so the mount that follows reads the device.
fn drop_cache_exclusive(device: &Path) -> Result<(), EngineError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(device).map_err(|e| {
        io(format!(
            "{}: {e} (still mounted or open elsewhere on this machine? unmount it before this node takes the volume)",
            device.display()
        ))
    })?;
    // _IO(0x12, 97)
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: an ioctl without arguments on a descriptor we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF as _) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(io(format!("{}: flushing its buffer cache: {e}", device.display())));
    }
    Ok(())
}

/// Runs `program args`; errors with its output when it fails.
fn run(program: &str, args: &[&str]) -> Result<String, EngineError> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| io(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(io(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The filesystem on `device` (`blkid -p`), `None` when the device holds
/// nothing blkid knows. Errors: the device cannot be read, blkid fails,
/// or it finds a partition table (or anything but a filesystem): a device
/// that holds something is never taken for blank.
fn filesystem_type(device: &Path) -> Result<Option<String>, EngineError> {
    std::fs::File::open(device).map_err(|e| io(format!("{}: {e}", device.display())))?;
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .map_err(|e| io(format!("cannot run blkid: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| stdout.lines().find_map(|l| l.strip_prefix(name)).map(str::to_string);
    match out.status.code() {
        // blkid exits with 2 when it finds nothing to report.
        Some(2) if stderr.trim().is_empty() => Ok(None),
        Some(0) => match (field("TYPE="), field("PTTYPE=")) {
            (Some(t), _) => Ok(Some(t)),
            (None, Some(pt)) => Err(io(format!(
                "{} holds a {pt} partition table, not a filesystem: give the volume a whole device",
                device.display()
            ))),
            (None, None) => {
                Err(io(format!("{} holds something blkid cannot name: {}", device.display(), stdout.trim())))
            }
        },
        _ => Err(io(format!("blkid {} failed ({}): {}", device.display(), out.status, stderr.trim()))),
    }
}

fn cstring(p: &Path) -> Result<std::ffi::CString, EngineError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io(format!("{} holds a NUL byte", p.display())))
}

fn mount(device: &Path, point: &Path, fstype: &str) -> Result<(), EngineError> {
    let (src, dst) = (cstring(device)?, cstring(point)?);
    let fstype = std::ffi::CString::new(fstype).map_err(|_| io("filesystem type holds a NUL byte"))?;
    // SAFETY: NUL-terminated strings that live across the call; no data.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(io(format!("mount {} at {}: {e}", device.display(), point.display())));
    }
    Ok(())
}

/// Unmounts `point`. With `lazy`, while files are still open there (a
/// shard that did not close in time) the mount is detached instead and
/// goes once they close; without, that is an error.
fn unmount(point: &Path, lazy: bool) -> Result<(), EngineError> {
    let target = cstring(point)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if lazy && e.raw_os_error() == Some(libc::EBUSY) {
        tracing::warn!(point = %point.display(), "files still open on the volume; detaching its mount lazily");
        // SAFETY: as above.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
    }
    Err(io(format!("unmount {}: {}", point.display(), std::io::Error::last_os_error())))
}

/// Whether `point` is a mount point (`/proc/self/mountinfo`, field 5).
pub fn is_mount_point(point: &Path) -> std::io::Result<bool> {
    let point = match std::fs::canonicalize(point) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(&unescape_octal(m)) == point))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait]
impl VolumeProvider for BlockVolumes {
    /// A volume whose device exists is attached. Otherwise, in aws mode,
    /// attaches it to this instance through EC2 (idempotent) and waits up
    /// to [`DEVICE_WAIT`] for its device; in block mode attaching is the
    /// operator's, so a missing device is an error.
    async fn attach(&self, volume: &str) -> Result<(), EngineError> {
        let device = self.device(volume)?.clone();
        if let (false, Some(ec2)) = (device.exists(), &self.ec2) {
            ec2.attach(volume).await.map_err(|e| io(format!("{e:#}")))?;
            let deadline = tokio::time::Instant::now() + DEVICE_WAIT;
            while !device.exists() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        if device.exists() {
            Ok(())
        } else {
            Err(io(format!("volume {volume}: no block device at {}", device.display())))
        }
    }

    async fn is_attached(&self, volume: &str) -> bool {
        self.devices.get(volume).is_some_and(|d| d.exists())
    }

    /// The device fence, then the mount, then the `EPOCH` file on it (see
    /// [`Claim`]).
    async fn acquire(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        let term = self.terms.lock().expect("terms lock").get(volume).copied().unwrap_or(0);
        if let Some(nvme) = &self.nvme {
            take_fence(nvme, volume, epoch).await?;
        }
        let claim = Claim {
            volume: volume.to_string(),
            epoch,
            term,
            device: self.device(volume)?.clone(),
            point: self.mount_point(volume),
            format_new: self.format_new,
            exclusive: self.nvme.is_some(),
            local: self.local.clone(),
            terms: self.terms.clone(),
        };
        blocking(move || claim.run()).await
    }

    fn held_epoch(&self, volume: &str) -> Option<u64> {
        self.local.held_epoch(volume)
    }

    fn backups_read(&self) -> bool {
        false
    }

    /// Known only while this node has the volume's filesystem mounted.
    async fn free_bytes(&self, volume: &str) -> Option<u64> {
        let (device, point) = (self.device(volume).ok()?.clone(), self.mount_point(volume));
        blocking(move || mounted_from(&point, &device).unwrap_or(false).then(|| crate::files::free_bytes(&point)))
            .await
            .flatten()
    }

    /// Ends the term (a claim still mounting gives up) and unmounts,
    /// lazily if files are still open.
    async fn release(&self, volume: &str) -> Result<(), EngineError> {
        let (point, terms, volume) = (self.mount_point(volume), self.terms.clone(), volume.to_string());
        blocking(move || {
            let mut terms = terms.lock().expect("terms lock");
            *terms.entry(volume).or_default() += 1;
            if is_mount_point(&point).map_err(|e| io(format!("{}: {e}", point.display())))? {
                unmount(&point, true)?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl EngineFactory for BlockVolumes {
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError> {
        self.mounted_volume_of(path)?;
        self.local.open(path, mode).await
    }

    async fn exists(&self, path: &Path) -> Result<bool, EngineError> {
        self.mounted_volume_of(path)?;
        self.local.exists(path).await
    }

    async fn destroy(&self, path: &Path) -> Result<(), EngineError> {
        self.mounted_volume_of(path)?;
        self.local.destroy(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebs_devices_are_found_by_volume_id() {
        assert_eq!(
            ebs_device("vol-0123456789abcdef0"),
            PathBuf::from("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0")
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_octal(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape_octal(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()).unwrap());
        assert!(!is_mount_point(&dir.path().join("missing")).unwrap());
    }

    #[test]
    fn start_up_checks_name_what_is_missing() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED start_up_checks_name_what_is_missing: not root (the root check comes first)");
            return;
        }
        let devices = BTreeMap::from([("a".to_string(), PathBuf::from("/dev/null")), ("b".into(), "/dev/null".into())]);
        let err = |root: &str, volumes: &[&str], fence| {
            let volumes: Vec<String> = volumes.iter().map(|v| v.to_string()).collect();
            BlockVolumes::new(root, &volumes, &devices, false, fence).check().unwrap_err().to_string()
        };
        assert!(err("/", &["a"], VolumeFence::EpochFile).contains("--volume-root"));
        assert!(err("/mnt/x", &["a", "b"], VolumeFence::EpochFile).contains("both on /dev/null"));
        assert!(err("/mnt/x", &["vol-0abc"], VolumeFence::EpochFile).contains("Amazon_Elastic_Block_Store_vol0abc"));
        assert!(err("/mnt/x", &["a"], VolumeFence::Nvme).contains("NVMe namespace"));
        assert!(err("/mnt/x", &[".."], VolumeFence::EpochFile).contains("plain directory name"));
    }

    #[actix_rt::test]
    async fn shards_open_only_on_a_mounted_volume() {
        let dir = tempfile::tempdir().unwrap();
        let devices = BTreeMap::from([("v".to_string(), dir.path().join("no-device"))]);
        let volumes = BlockVolumes::new(dir.path(), &["v".to_string()], &devices, false, VolumeFence::EpochFile);
        assert!(!volumes.is_attached("v").await);
        assert!(!volumes.backups_read());
        let refused = volumes.open(&dir.path().join("v/shard-1"), OpenMode::ReadWrite { create: true }).await;
        assert!(matches!(&refused, Err(EngineError::Io(m)) if m.contains("not mounted")), "{:?}", refused.err());
        assert!(!dir.path().join("v/shard-1").exists(), "nothing was created under the empty mount point");
    }
}
