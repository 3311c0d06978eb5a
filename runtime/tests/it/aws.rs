//! The AWS EBS provider (`attache_runtime::aws`) and `attache volume`
//! against a local EC2 API emulator: moto's server (`moto_server`, which
//! `scripts/install-deps.sh` installs; `ATTACHE_MOTO_SERVER` names another),
//! started by the test on a free loopback port.
//!
//! What moto does not emulate, so this test cannot show: more than one
//! attachment per volume (a second instance's attach replaces the first),
//! the 16-attachment limit, refusing to attach a volume without
//! multi-attach (or of another zone) to a second instance, the
//! `attaching` state lasting (it answers `attached` at once), NVMe devices
//! and reservations. `AwsEbs`'s rules for those are unit tests of
//! `plan_attach` and `unfit`; `scripts/aws-check.sh` is the check on real
//! EC2.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use attache_runtime::aws::{AttachWait, AwsEbs};
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Placement, VolumeType};
use aws_sdk_ec2::Client;

const REGION: &str = "us-east-1";
const ZONE: &str = "us-east-1a";

/// moto's EC2 API server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn binary() -> String {
        std::env::var("ATTACHE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into())
    }

    /// Starts the server and waits (up to 60 s) until it answers an EC2
    /// call; a port taken before moto bound it is tried again elsewhere.
    async fn start() -> Moto {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new(Self::binary())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {} ({e}): run scripts/install-deps.sh", Self::binary()));
            let mut moto = Moto { child, url: format!("http://127.0.0.1:{port}") };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if moto.client().describe_regions().send().await.is_ok() {
                    return moto;
                }
                if let Some(status) = moto.child.try_wait().unwrap() {
                    assert!(
                        status.code() != Some(1) || port_taken(port),
                        "moto's server exited ({status}): is moto installed? (scripts/install-deps.sh installs it)"
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "moto did not answer on {} within 60 s", moto.url);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto's server exited at start 5 times (ports taken?)");
    }

    fn client(&self) -> Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
            .endpoint_url(&self.url)
            .build();
        Client::from_conf(config)
    }

    /// `attache ARGS`, its AWS SDK's default chain pointed at moto by the
    /// environment (no instance metadata service, no instance id).
    fn attache(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_attache"));
        cmd.args(args)
            .env("AWS_ENDPOINT_URL", &self.url)
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("INSTANCE_ID");
        cmd
    }

    /// `attache volume ARGS` as `instance`.
    fn volume_cli(&self, instance: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.attache(&["volume"]);
        cmd.args(args).env("INSTANCE_ID", instance).output().expect("run attache volume")
    }
}

fn port_taken(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn instance(ec2: &Client, zone: &str) -> String {
    let out = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(1)
        .max_count(1)
        .placement(Placement::builder().availability_zone(zone).build())
        .send()
        .await
        .expect("run instance");
    out.instances()[0].instance_id().unwrap().to_string()
}

async fn volume(ec2: &Client, kind: VolumeType, multi_attach: bool, zone: &str) -> String {
    let mut call = ec2.create_volume().availability_zone(zone).size(10).volume_type(kind.clone());
    if matches!(kind, VolumeType::Io1 | VolumeType::Io2) {
        call = call.iops(1000).multi_attach_enabled(multi_attach);
    }
    call.send().await.expect("create volume").volume_id().unwrap().to_string()
}

/// The instances `volume` is attached to, with the device names, as EC2 says.
async fn attachments(ec2: &Client, volume: &str) -> Vec<(String, String)> {
    let out = ec2.describe_volumes().volume_ids(volume).send().await.expect("describe volume");
    out.volumes()[0]
        .attachments()
        .iter()
        .map(|a| (a.instance_id().unwrap().to_string(), a.device().unwrap().to_string()))
        .collect()
}

/// How many block device mappings of `instance` name `volume`.
async fn mappings(ec2: &Client, instance: &str, volume: &str) -> usize {
    let out = ec2.describe_instances().instance_ids(instance).send().await.expect("describe instance");
    let instances = out.reservations().iter().flat_map(|r| r.instances());
    let mapped = instances.flat_map(|i| i.block_device_mappings());
    mapped.filter(|m| m.ebs().and_then(|e| e.volume_id()) == Some(volume)).count()
}

#[tokio::test]
async fn the_ebs_provider_checks_attaches_idempotently_and_detaches_only_on_request() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let me = instance(&ec2, ZONE).await;
    let good = volume(&ec2, VolumeType::Io2, true, ZONE).await;
    let gp3 = volume(&ec2, VolumeType::Gp3, false, ZONE).await;
    let single = volume(&ec2, VolumeType::Io2, false, ZONE).await;
    let far = volume(&ec2, VolumeType::Io2, true, "us-east-1b").await;

    let aws = AwsEbs::for_instance(ec2.clone(), me.clone())
        .await
        .unwrap()
        .with_wait(AttachWait { poll_ms: 50, limit_ms: 10_000 });
    assert_eq!(aws.zone(), ZONE);

    // Start-up checks: the good volume passes; each unfit one is named with why.
    aws.check(std::slice::from_ref(&good)).await.unwrap();
    let all = [good.clone(), gp3.clone(), single.clone(), far.clone()];
    let err = format!("{:#}", aws.check(&all).await.unwrap_err());
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(err.contains(&format!("volume {gp3} is gp3")), "{err}");
    assert!(err.contains(&format!("volume {single} does not have multi-attach enabled")), "{err}");
    assert!(err.contains(&format!("volume {far} is in availability zone us-east-1b")), "{err}");
    let missing = format!("{:#}", aws.check(&["vol-0123456789abcdef0".to_string()]).await.unwrap_err());
    assert!(missing.contains("vol-0123456789abcdef0"), "{missing}");

    // Attach: once, and again without a second attachment.
    aws.attach(&good).await.unwrap();
    let first = attachments(&ec2, &good).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].0, me);
    assert!(first[0].1.starts_with("/dev/sd"), "{first:?}");
    aws.attach(&good).await.unwrap();
    assert_eq!(attachments(&ec2, &good).await, first, "a second attach changes nothing");
    assert_eq!(mappings(&ec2, &me, &good).await, 1, "one device mapping for the volume");
    let here = aws.attached_here().await.unwrap();
    assert!(here.contains(&good) && here.len() == 2, "the volume and the instance's root volume: {here:?}");

    // A second volume gets another device name.
    let other = volume(&ec2, VolumeType::Io2, true, ZONE).await;
    aws.attach(&other).await.unwrap();
    let second = attachments(&ec2, &other).await;
    assert_ne!(second[0].1, first[0].1, "two volumes on one device name");

    // Detach only on request; twice is no error.
    aws.detach(&good).await.unwrap();
    assert!(attachments(&ec2, &good).await.is_empty());
    aws.detach(&good).await.unwrap();

    // A volume that does not exist fails the attach with its id.
    let err = format!("{:#}", aws.attach("vol-0123456789abcdef0").await.unwrap_err());
    assert!(err.contains("vol-0123456789abcdef0"), "{err}");
}

#[tokio::test]
async fn attache_volume_describes_attaches_and_detaches_through_the_default_chain() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let me = instance(&ec2, ZONE).await;
    let good = volume(&ec2, VolumeType::Io2, true, ZONE).await;
    let gp3 = volume(&ec2, VolumeType::Gp3, false, ZONE).await;

    let out = moto.volume_cli(&me, &["describe", &good, &gp3]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("instance {me} in {ZONE}")), "{text}");
    assert!(text.contains(&format!("{good}: io2 10 GiB, multi-attach on, {ZONE}; attached to: none")), "{text}");
    assert!(text.contains("usable by attache node --volume-mode aws here"), "{text}");
    assert!(text.contains("not usable: volume") && text.contains("is gp3"), "{text}");

    let out = moto.volume_cli(&me, &["attach", &good]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(attachments(&ec2, &good).await.len(), 1);
    let out = moto.volume_cli(&me, &["detach", &good]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(attachments(&ec2, &good).await.is_empty());

    // No instance id and no metadata service: a clear error.
    let out = moto.attache(&["volume", "describe", &good]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("set INSTANCE_ID or --instance-id"), "{err}");
}

/// `attache node --volume-mode aws` refuses to start on an unfit volume,
/// saying why, before it touches any device.
#[tokio::test]
async fn a_node_in_aws_mode_refuses_a_volume_without_multi_attach() {
    let moto = Moto::start().await;
    let ec2 = moto.client();
    let me = instance(&ec2, ZONE).await;
    let single = volume(&ec2, VolumeType::Io2, false, ZONE).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("volumes");
    std::fs::create_dir_all(&root).unwrap();
    let out = moto
        .attache(&["node", "--volume-mode", "aws", "--volumes", &single, "--listen", "127.0.0.1:0"])
        .arg("--metadata")
        .arg(format!("embedded:{}", dir.path().join("meta").display()))
        .arg("--volume-root")
        .arg(&root)
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .env("INSTANCE_ID", &me)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(err.contains(&format!("volume {single} does not have multi-attach enabled")), "{err}");
    } else {
        assert!(err.contains("run attache node as root"), "{err}");
    }
    assert!(attachments(&ec2, &single).await.is_empty(), "nothing was attached");
}

/// An EC2 endpoint that accepts connections and never answers: every EC2
/// call must still end, within `EC2_CALL_TIMEOUT` (attempts of
/// `EC2_ATTEMPT_TIMEOUT`, retried), with an error that says it timed out.
/// `attache volume describe` against it (it describes this instance, then
/// the volume) exits with that error.
#[test]
fn ec2_calls_to_an_endpoint_that_never_answers_end_within_their_deadline() {
    use attache_runtime::aws::{EC2_ATTEMPT_TIMEOUT, EC2_CALL_TIMEOUT};
    let silent = crate::common::Silent::start();
    let url = format!("http://{}", silent.addr);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["volume", "--instance-id", "i-0123456789abcdef0", "describe", "vol-0123456789abcdef0"])
        .env("AWS_ENDPOINT_URL", &url)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run attache volume");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "describe against a silent endpoint failed: {stderr}");
    assert!(stderr.to_lowercase().contains("timeout") || stderr.contains("timed out"), "says it timed out: {stderr}");
    assert!(took >= EC2_ATTEMPT_TIMEOUT, "the call waited its attempt timeout ({took:?}): {stderr}");
    assert!(took < EC2_CALL_TIMEOUT + Duration::from_secs(10), "the call ended by its deadline ({took:?}): {stderr}");
    eprintln!("attache volume describe against a silent endpoint failed after {took:?}: {}", stderr.trim());
    assert!(silent.stop() >= 1, "the call reached the silent endpoint");
}
