//! `AwsEbs` (`--volume-mode aws`): EBS volumes reached through the EC2 API
//! with the official AWS SDK for Rust, as io2 multi-attach needs them.
//!
//! - Start-up ([`AwsEbs::check`]): every configured volume exists, is a
//!   Provisioned IOPS SSD (io1 or io2: the types with multi-attach), has
//!   multi-attach enabled, and lies in this instance's availability zone.
//! - [`AwsEbs::attach`] attaches a volume to this instance unless it already
//!   is (idempotent), within io2's 16 attachments, waits until EC2 says
//!   `attached`; `BlockVolumes` then waits for its NVMe device
//!   (`/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…`).
//! - [`AwsEbs::detach`] runs only on request (`attache volume detach`),
//!   never during a failover: a backup keeps the volume attached, and the
//!   NVMe reservation, not a detach, fences the deposed primary.
//!
//! Configuration: the instance id from `INSTANCE_ID` (`--instance-id`) or
//! the instance metadata service; the region from `AWS_REGION`
//! (`--region`) or the SDK's default chain; credentials from the SDK's
//! default chain (environment, profile, instance role). `AWS_ENDPOINT_URL`
//! points the client at another EC2 endpoint (an emulator in tests).
//!
//! IAM permissions: `ec2:DescribeVolumes`, `ec2:DescribeInstances`,
//! `ec2:AttachVolume`, and `ec2:DetachVolume` for `attache volume detach`.

use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{Filter, Volume, VolumeAttachmentState, VolumeType};
use aws_sdk_ec2::Client;

/// Most instances one io2 volume attaches to at once (EBS multi-attach).
pub const MAX_ATTACHMENTS: usize = 16;

/// The device names `attach` picks from (`/dev/sdf` to `/dev/sdz`), as
/// EC2 asks for one; on Nitro instances the NVMe device is found by the
/// volume id whatever the name.
const DEVICE_LETTERS: std::ops::RangeInclusive<u8> = b'f'..=b'z';

/// Longest one attempt of an EC2 API call may take (then it is retried).
pub const EC2_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an EC2 API call may take, retries included (then it fails).
pub const EC2_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How the EC2 client is set up; unset fields come from the SDK's default
/// chain or the instance metadata service.
#[derive(Clone, Debug, Default)]
pub struct AwsSettings {
    /// The region (`AWS_REGION`); `None`: the SDK's default chain.
    pub region: Option<String>,
    /// This instance (`INSTANCE_ID`); `None`: the instance metadata service.
    pub instance_id: Option<String>,
}

/// How long `attach` and `detach` wait for EC2 to report the new state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachWait {
    /// Between two looks, ms.
    pub poll_ms: u64,
    /// In all, ms; past it the call fails (and may be tried again).
    pub limit_ms: u64,
}

impl Default for AttachWait {
    /// A look each second for up to two minutes (attachments take seconds).
    fn default() -> Self {
        AttachWait { poll_ms: 1_000, limit_ms: 120_000 }
    }
}

/// EBS volumes of one EC2 instance; see the module docs.
pub struct AwsEbs {
    ec2: Client,
    instance_id: String,
    zone: String,
    wait: AttachWait,
    /// One attach at a time, so two never pick the same device name.
    attaching: tokio::sync::Mutex<()>,
}

/// What `attach` does next, given the volume as EC2 describes it
/// ([`plan_attach`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachStep {
    /// Attached to this instance: done.
    Attached,
    /// Attaching to (or detaching from) this instance: look again later.
    Wait(String),
    /// Not attached here, and there is room: call AttachVolume.
    Attach,
    /// It cannot be attached here: the reason.
    Refuse(String),
}

/// The next step of attaching `volume` to `instance`: by this instance's
/// attachment's state, else by the number of instances it is attached to
/// (at most [`MAX_ATTACHMENTS`]) and whether multi-attach is on (without
/// it, one).
pub fn plan_attach(volume: &Volume, instance: &str) -> AttachStep {
    let id = volume.volume_id().unwrap_or("?");
    let mine = volume.attachments().iter().find(|a| a.instance_id() == Some(instance));
    match mine.and_then(|a| a.state()) {
        Some(VolumeAttachmentState::Attached) => return AttachStep::Attached,
        Some(VolumeAttachmentState::Detached) | None => {}
        Some(state) => return AttachStep::Wait(format!("volume {id} is {} on this instance", state.as_str())),
    }
    let others = volume
        .attachments()
        .iter()
        .filter(|a| a.instance_id() != Some(instance) && a.state() != Some(&VolumeAttachmentState::Detached))
        .count();
    let most = if volume.multi_attach_enabled() == Some(true) { MAX_ATTACHMENTS } else { 1 };
    if others >= most {
        return AttachStep::Refuse(format!(
            "volume {id} is attached to {others} other instance(s), the most it can be ({most}{}): detach it from \
             one (attache volume detach) first",
            if most == 1 { ", multi-attach is off" } else { ", io2 multi-attach's limit" }
        ));
    }
    AttachStep::Attach
}

/// Why `volume` cannot serve as a shared Attaché volume on an instance in
/// `zone`, or `None` when it can: not io1/io2, multi-attach off, or another
/// availability zone.
pub fn unfit(volume: &Volume, zone: &str) -> Option<String> {
    let id = volume.volume_id().unwrap_or("?");
    let kind = volume.volume_type();
    if !matches!(kind, Some(VolumeType::Io1 | VolumeType::Io2)) {
        let kind = kind.map_or("of no type", |k| k.as_str());
        return Some(format!(
            "volume {id} is {kind}: multi-attach needs a Provisioned IOPS SSD (io2, or io1); create an io2 volume \
             with multi-attach enabled"
        ));
    }
    if volume.multi_attach_enabled() != Some(true) {
        return Some(format!(
            "volume {id} does not have multi-attach enabled: enable it (aws ec2 modify-volume --volume-id {id} \
             --multi-attach-enabled, on an io2 volume) or create one with --multi-attach-enabled"
        ));
    }
    match volume.availability_zone() {
        Some(az) if az == zone => None,
        az => Some(format!(
            "volume {id} is in availability zone {}, this instance in {zone}: multi-attach works within one zone",
            az.unwrap_or("(none)")
        )),
    }
}

fn sdk<E, R>(what: &str, e: aws_sdk_ec2::error::SdkError<E, R>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    anyhow::anyhow!("{what}: {}", DisplayErrorContext(e))
}

impl AwsEbs {
    /// The EC2 client of the SDK's default chain with `settings` on top,
    /// for this instance (its id from the instance metadata service unless
    /// given), whose availability zone it looks up.
    ///
    /// Errors: no region, no instance id (not on EC2 and none given), or
    /// the instance cannot be described (credentials, permissions).
    pub async fn connect(settings: &AwsSettings) -> anyhow::Result<AwsEbs> {
        // Every EC2 call has a deadline: an attempt may take 10 s, a call
        // with its retries 30 s (the SDK sets none by default).
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(EC2_ATTEMPT_TIMEOUT)
            .operation_timeout(EC2_CALL_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let config = loader.load().await;
        anyhow::ensure!(
            config.region().is_some(),
            "--volume-mode aws needs an AWS region: set AWS_REGION or --region (or run on EC2)"
        );
        let instance_id = match &settings.instance_id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => {
                let imds = aws_config::imds::Client::builder().build();
                let id = tokio::time::timeout(Duration::from_secs(10), imds.get("/latest/meta-data/instance-id"))
                    .await
                    .map_err(|_| anyhow::anyhow!("no answer in 10 s"))
                    .and_then(|r| r.map_err(anyhow::Error::from))
                    .context(
                        "--volume-mode aws needs this instance's id: set INSTANCE_ID or --instance-id (the \
                         instance metadata service did not give it)",
                    )?;
                id.as_ref().to_string()
            }
        };
        AwsEbs::for_instance(Client::new(&config), instance_id).await
    }

    /// `ec2`'s view of `instance_id`, whose availability zone it looks up.
    ///
    /// Errors: the instance does not exist or cannot be described.
    pub async fn for_instance(ec2: Client, instance_id: String) -> anyhow::Result<AwsEbs> {
        let out = ec2
            .describe_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .map_err(|e| sdk(&format!("cannot describe instance {instance_id}"), e))?;
        let instance = out.reservations().iter().flat_map(|r| r.instances()).next();
        let zone = instance
            .and_then(|i| i.placement())
            .and_then(|p| p.availability_zone())
            .with_context(|| format!("instance {instance_id} has no availability zone in EC2's answer"))?
            .to_string();
        Ok(AwsEbs { ec2, instance_id, zone, wait: AttachWait::default(), attaching: tokio::sync::Mutex::new(()) })
    }

    /// The same, waiting `wait` for attachments.
    pub fn with_wait(mut self, wait: AttachWait) -> Self {
        self.wait = wait;
        self
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// This instance's availability zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The volumes `ids` as EC2 describes them, in the order given.
    ///
    /// Errors: one does not exist, or the call fails.
    pub async fn describe(&self, ids: &[String]) -> anyhow::Result<Vec<Volume>> {
        let out = self
            .ec2
            .describe_volumes()
            .set_volume_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| sdk(&format!("cannot describe volumes {}", ids.join(", ")), e))?;
        ids.iter()
            .map(|id| {
                out.volumes()
                    .iter()
                    .find(|v| v.volume_id() == Some(id.as_str()))
                    .cloned()
                    .with_context(|| format!("volume {id} does not exist (or is not visible to these credentials)"))
            })
            .collect()
    }

    /// Checks that each of `volumes` can serve: see [`unfit`].
    ///
    /// Errors: every unfit volume, one per line, or the describe call's.
    pub async fn check(&self, volumes: &[String]) -> anyhow::Result<()> {
        let described = self.describe(volumes).await?;
        let problems: Vec<String> = described.iter().filter_map(|v| unfit(v, &self.zone)).collect();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
        Ok(())
    }

    /// Attaches `volume` to this instance unless it is (idempotent), and
    /// waits until EC2 reports it attached (see [`AttachWait`]).
    ///
    /// Errors: the volume cannot be attached here ([`plan_attach`]), an
    /// EC2 call fails, or the attachment is not done in time.
    pub async fn attach(&self, volume: &str) -> anyhow::Result<()> {
        let _one = self.attaching.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.wait.limit_ms);
        let mut asked = false;
        loop {
            let described = self.describe(&[volume.to_string()]).await?;
            let why = match plan_attach(&described[0], &self.instance_id) {
                AttachStep::Attached => return Ok(()),
                AttachStep::Refuse(why) => anyhow::bail!(why),
                AttachStep::Wait(why) => why,
                AttachStep::Attach if asked => format!("volume {volume} is not attached yet"),
                AttachStep::Attach => {
                    let device = self.free_device_name().await?;
                    self.ec2
                        .attach_volume()
                        .volume_id(volume)
                        .instance_id(&self.instance_id)
                        .device(&device)
                        .send()
                        .await
                        .map_err(|e| sdk(&format!("cannot attach volume {volume} as {device}"), e))?;
                    asked = true;
                    continue;
                }
            };
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{why} after {} ms", self.wait.limit_ms);
            tokio::time::sleep(Duration::from_millis(self.wait.poll_ms)).await;
        }
    }

    /// Detaches `volume` from this instance (nothing when it is not
    /// attached) and waits until EC2 reports it gone. Only on request: a
    /// failover never detaches.
    ///
    /// Errors: an EC2 call fails, or the detachment is not done in time.
    pub async fn detach(&self, volume: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.wait.limit_ms);
        let mut asked = false;
        loop {
            let described = self.describe(&[volume.to_string()]).await?;
            let mine = described[0].attachments().iter().find(|a| a.instance_id() == Some(self.instance_id.as_str()));
            let state = mine.and_then(|a| a.state()).cloned();
            match state {
                None | Some(VolumeAttachmentState::Detached) => return Ok(()),
                Some(VolumeAttachmentState::Attached | VolumeAttachmentState::Busy) if !asked => {
                    self.ec2
                        .detach_volume()
                        .volume_id(volume)
                        .instance_id(&self.instance_id)
                        .send()
                        .await
                        .map_err(|e| sdk(&format!("cannot detach volume {volume}"), e))?;
                    asked = true;
                    continue;
                }
                Some(_) => {}
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "volume {volume} is still attached to {} after {} ms",
                self.instance_id,
                self.wait.limit_ms
            );
            tokio::time::sleep(Duration::from_millis(self.wait.poll_ms)).await;
        }
    }

    /// A device name (`/dev/sdf` to `/dev/sdz`) that no block device of
    /// this instance has.
    async fn free_device_name(&self) -> anyhow::Result<String> {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(&self.instance_id)
            .send()
            .await
            .map_err(|e| sdk(&format!("cannot describe instance {}", self.instance_id), e))?;
        let used: Vec<String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.device_name().map(str::to_string))
            .collect();
        DEVICE_LETTERS
            .map(|c| format!("/dev/sd{}", c as char))
            .find(|name| !used.iter().any(|u| u == name || u.strip_prefix("/dev/xvd") == name.strip_prefix("/dev/sd")))
            .with_context(|| format!("instance {} has no free device name from /dev/sdf to /dev/sdz", self.instance_id))
    }

    /// Volumes attached to this instance now (any state but detached), by id.
    ///
    /// Errors: the describe call fails.
    pub async fn attached_here(&self) -> anyhow::Result<Vec<String>> {
        let out = self
            .ec2
            .describe_volumes()
            .filters(Filter::builder().name("attachment.instance-id").values(&self.instance_id).build())
            .send()
            .await
            .map_err(|e| sdk("cannot describe this instance's volumes", e))?;
        Ok(out.volumes().iter().filter_map(|v| v.volume_id().map(str::to_string)).collect())
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{Volume, VolumeAttachment, VolumeAttachmentState, VolumeType};

    use super::{plan_attach, unfit, AttachStep, MAX_ATTACHMENTS};

    fn volume(multi: bool, attached: &[(&str, VolumeAttachmentState)]) -> Volume {
        let mut v = Volume::builder()
            .volume_id("vol-1")
            .volume_type(VolumeType::Io2)
            .multi_attach_enabled(multi)
            .availability_zone("us-east-1a");
        for (instance, state) in attached {
            v = v.attachments(VolumeAttachment::builder().instance_id(*instance).state(state.clone()).build());
        }
        v.build()
    }

    #[test]
    fn attach_is_idempotent_and_waits_out_a_change_under_way() {
        let attached = volume(true, &[("i-me", VolumeAttachmentState::Attached)]);
        assert_eq!(plan_attach(&attached, "i-me"), AttachStep::Attached);
        let attaching =
            volume(true, &[("i-other", VolumeAttachmentState::Attached), ("i-me", VolumeAttachmentState::Attaching)]);
        assert!(matches!(plan_attach(&attaching, "i-me"), AttachStep::Wait(w) if w.contains("attaching")));
        let detaching = volume(true, &[("i-me", VolumeAttachmentState::Detaching)]);
        assert!(matches!(plan_attach(&detaching, "i-me"), AttachStep::Wait(_)));
        assert_eq!(plan_attach(&volume(true, &[]), "i-me"), AttachStep::Attach);
    }

    #[test]
    fn attach_stays_within_sixteen_instances_and_one_without_multi_attach() {
        let names: Vec<String> = (0..MAX_ATTACHMENTS).map(|i| format!("i-{i}")).collect();
        let fifteen: Vec<_> = names[..15].iter().map(|n| (n.as_str(), VolumeAttachmentState::Attached)).collect();
        assert_eq!(plan_attach(&volume(true, &fifteen), "i-me"), AttachStep::Attach);
        let sixteen: Vec<_> = names.iter().map(|n| (n.as_str(), VolumeAttachmentState::Attached)).collect();
        assert!(matches!(plan_attach(&volume(true, &sixteen), "i-me"), AttachStep::Refuse(w) if w.contains("16")));
        let mut gone = sixteen.clone();
        gone[0].1 = VolumeAttachmentState::Detached;
        assert_eq!(plan_attach(&volume(true, &gone), "i-me"), AttachStep::Attach, "a detached one does not count");
        let single = volume(false, &[("i-other", VolumeAttachmentState::Attached)]);
        assert!(matches!(plan_attach(&single, "i-me"), AttachStep::Refuse(w) if w.contains("multi-attach is off")));
    }

    #[test]
    fn only_io1_and_io2_with_multi_attach_in_this_zone_are_fit() {
        assert_eq!(unfit(&volume(true, &[]), "us-east-1a"), None);
        let other_zone = unfit(&volume(true, &[]), "us-east-1b").unwrap();
        assert!(other_zone.contains("us-east-1a") && other_zone.contains("us-east-1b"), "{other_zone}");
        assert!(unfit(&volume(false, &[]), "us-east-1a").unwrap().contains("multi-attach"));
        let gp3 = Volume::builder().volume_id("vol-2").volume_type(VolumeType::Gp3).build();
        assert!(unfit(&gp3, "us-east-1a").unwrap().contains("gp3"));
        let io1 = Volume::builder()
            .volume_id("vol-3")
            .volume_type(VolumeType::Io1)
            .multi_attach_enabled(true)
            .availability_zone("us-east-1a")
            .build();
        assert_eq!(unfit(&io1, "us-east-1a"), None);
    }
}
