//! `attache volume`: a machine's EBS volumes through the EC2 API, for an
//! operator: describe them as Attaché would check them, attach them, and
//! detach them (a node never detaches a volume itself; a failover does not
//! need it).

use clap::{Args, Subcommand};

use crate::aws::{unfit, AwsEbs, AwsSettings};

/// `attache volume` flags.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// Cloud region (`AWS_REGION`); default: the AWS SDK's default chain.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// This instance's id (`INSTANCE_ID`); default: the instance metadata service.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    #[command(subcommand)]
    pub cmd: VolumeCmd,
}

/// What `attache volume` does.
#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Print each volume's type, multi-attach, zone and attachments, and
    /// whether `attache node --volume-mode aws` on this instance can use it.
    Describe {
        /// EBS volume ids (`vol-...`).
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Attach volumes to this instance (nothing for one that is) and wait
    /// until EC2 reports them attached.
    Attach {
        /// EBS volume ids (`vol-...`).
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Detach volumes from this instance and wait until EC2 reports them
    /// detached. Stop the node serving them first: a node whose volume
    /// goes away gives it up to a backup.
    Detach {
        /// EBS volume ids (`vol-...`).
        #[arg(required = true)]
        volumes: Vec<String>,
    },
}

/// Runs `attache volume`.
///
/// Errors: the EC2 client cannot be set up (region, instance id,
/// credentials), or a call fails; `describe` of an unfit volume is not an
/// error (it says why).
pub async fn run(args: VolumeArgs) -> anyhow::Result<()> {
    let ec2 = AwsEbs::connect(&AwsSettings { region: args.region, instance_id: args.instance_id }).await?;
    match args.cmd {
        VolumeCmd::Describe { volumes } => {
            println!("instance {} in {}", ec2.instance_id(), ec2.zone());
            for v in ec2.describe(&volumes).await? {
                let attachments: Vec<String> = v
                    .attachments()
                    .iter()
                    .map(|a| {
                        let state = a.state().map_or("?", |s| s.as_str());
                        format!("{} {} ({state})", a.instance_id().unwrap_or("?"), a.device().unwrap_or("?"))
                    })
                    .collect();
                println!(
                    "{}: {} {} GiB, multi-attach {}, {}; attached to: {}",
                    v.volume_id().unwrap_or("?"),
                    v.volume_type().map_or("?", |t| t.as_str()),
                    v.size().unwrap_or(0),
                    if v.multi_attach_enabled() == Some(true) { "on" } else { "off" },
                    v.availability_zone().unwrap_or("?"),
                    if attachments.is_empty() { "none".into() } else { attachments.join(", ") },
                );
                match unfit(&v, ec2.zone()) {
                    None => println!("  usable by attache node --volume-mode aws here"),
                    Some(why) => println!("  not usable: {why}"),
                }
            }
        }
        VolumeCmd::Attach { volumes } => {
            for volume in volumes {
                ec2.attach(&volume).await?;
                println!("{volume}: attached to {}", ec2.instance_id());
            }
        }
        VolumeCmd::Detach { volumes } => {
            for volume in volumes {
                ec2.detach(&volume).await?;
                println!("{volume}: detached from {}", ec2.instance_id());
            }
        }
    }
    Ok(())
}
