//! Failover time with real processes: one `attache meta` and three `attache
//! node` processes on one volume (local directories, lease TTL 2 s, the
//! default failover timing), a client putting keys one at a time through the
//! retrying client, and `--kills` rounds of: SIGKILL the primary, time until
//! another node acknowledges a write, start the killed node again (as a
//! backup), wait until its lease is live. Prints each round (the new
//! primary's own account of its takeover from its "primary for volume" log
//! line: wait, compare-and-swap, fence, open; detect is the rest of the
//! time from SIGKILL to that line, and first write the time from it to the
//! client's first acknowledged write) and p50/p99/max of the failover time
//! (SIGKILL to the first write acknowledged by the new primary). Every
//! acknowledged write is read back at the end.
//!
//! Run: `cargo build -p attache-runtime --bin attache && cargo run -p
//! attache-runtime --example failover_bench [-- --kills 10]` (it starts the
//! `attache` binary next to its own directory, `target/debug/attache`, or
//! `ATTACHE_BIN`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use attache_actors::client::{CallSpec, Client, ClientSettings};
use attache_actors::service::proto::{GetRequest, NewShardRequest, PutRequest};

const LEASE_TTL_MS: u64 = 2000;

fn attache_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ATTACHE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("own path");
    let bin = exe.parent().and_then(Path::parent).expect("target/debug/examples").join("attache");
    assert!(bin.exists(), "no {}: run `cargo build -p attache-runtime --bin attache` first", bin.display());
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A started process, the address it printed, and the lines of its log
/// (stderr, JSON) and stdout.
struct Proc {
    child: Child,
    addr: String,
    /// Each line with when it was read.
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `attache args` and waits for a stdout line containing `marker`
/// followed by an address.
fn start(args: &[String], marker: &str) -> Proc {
    let child = Command::new(attache_bin())
        .args(args)
        .env("ATTACHE_LOG_LEVEL", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start attache");
    let (tx, lines) = mpsc::channel();
    // From here on, Drop kills and reaps the child whatever happens.
    let mut proc = Proc { child, addr: String::new(), lines };
    for pipe in [
        Box::new(proc.child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(proc.child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, line) =
            proc.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("attache started");
        if let Some(rest) = line.split(marker).nth(1) {
            proc.addr = rest.split_whitespace().next().expect("an address after the marker").to_string();
            return proc;
        }
    }
}

fn node_args(root: &Path, name: &str, port: u16, metadata: &str) -> Vec<String> {
    let (data, volumes) = (root.join(name), root.join("volumes"));
    let args = [
        "node",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        data.to_str().unwrap(),
        "--volume-root",
        volumes.to_str().unwrap(),
        "--volumes",
        "vol-1",
        "--metadata",
        metadata,
        "--lease-ttl-ms",
        &LEASE_TTL_MS.to_string(),
        "--log-format",
        "json",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// The new primary's takeover as it logged it: when the line was read, and
/// (wait, cas, fence, open) ms.
fn takeover_line(lines: &mpsc::Receiver<(Instant, String)>) -> Option<(Instant, [u64; 4])> {
    for (at, line) in lines.try_iter() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let f = &v["fields"];
        if f["message"] == "primary for volume" && f["takeover"] == true {
            let ms = |k: &str| f[k].as_u64().unwrap_or(0);
            return Some((at, [ms("wait_ms"), ms("cas_ms"), ms("fence_ms"), ms("open_ms")]));
        }
    }
    None
}

/// One acknowledged put: its key, when it was acknowledged, by which node.
struct Ack {
    key: String,
    at: Instant,
    by: String,
}

fn main() {
    let kills: usize = std::env::args()
        .skip_while(|a| a != "--kills")
        .nth(1)
        .map(|s| s.parse().expect("--kills takes a whole number"))
        .unwrap_or(10);
    let root = tempfile::tempdir().unwrap();
    let meta = start(
        &["meta", "--listen", "127.0.0.1:0", "--data-dir", root.path().join("meta").to_str().unwrap()]
            .map(String::from),
        "serving gRPC on ",
    );
    let metadata = format!("grpc://{}", meta.addr);
    let names = ["node-a", "node-b", "node-c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // Started one by one, so the first is the primary of vol-1.
    let mut nodes: Vec<Proc> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| start(&node_args(root.path(), n, *p, &metadata), "serving gRPC on "))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let c = Client::new(&addrs, ClientSettings { deadline_ms: 60_000, ..ClientSettings::default() }).unwrap();
        let shard = c
            .call(CallSpec::any().once().starting_at(0), |mut s| async move {
                s.new_shard(NewShardRequest { client_id: "bench".into(), size_limit_bytes: 0 }).await
            })
            .await
            .unwrap()
            .value
            .shard_id;
        let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let (c, acks, stop) = (c.clone(), acks.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("k{i:08}");
                    let req = PutRequest {
                        shard_id: shard,
                        client_id: "bench".into(),
                        key: key.clone().into_bytes(),
                        value: vec![b'v'; 100],
                        indexes: vec![],
                        request_id: c.request_id(),
                    };
                    let r = c
                        .call(CallSpec::shard(shard), |mut s| {
                            let r = req.clone();
                            async move { s.put(r).await }
                        })
                        .await;
                    if let Ok(served) = r {
                        acks.lock().unwrap().push(Ack { key, at: Instant::now(), by: served.addr });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let last_by = |acks: &Mutex<Vec<Ack>>| acks.lock().unwrap().last().map(|a| a.by.clone());
        let mut times = Vec::new();
        println!("failover with real processes, lease TTL {LEASE_TTL_MS} ms, default failover timing");
        println!(
            "{:>4} {:>17} {:>17} {:>10} {:>9} {:>8} {:>7} {:>8} {:>7} {:>9}",
            "kill", "old primary", "new primary", "failover", "detect", "wait", "cas", "fence", "open", "1st write"
        );
        for k in 1..=kills {
            // The primary: the node that acknowledged the latest write.
            while last_by(&acks).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let old = last_by(&acks).unwrap();
            let i = addrs.iter().position(|a| *a == old).expect("an address of ours");
            let _ = nodes[i].child.kill(); // SIGKILL
            let killed = Instant::now();
            let _ = nodes[i].child.wait();
            let first_new = loop {
                let found = acks.lock().unwrap().iter().find(|a| a.at > killed && a.by != old).map(|a| (a.at, a.by.clone()));
                if let Some(f) = found {
                    break f;
                }
                assert!(killed.elapsed() < Duration::from_secs(60), "no failover within 60 s of kill {k}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let took = first_new.0 - killed;
            times.push(took);
            let j = addrs.iter().position(|a| *a == first_new.1).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (serving, [wait, cas, fence, open]) =
                takeover_line(&nodes[j].lines).expect("the new primary logged its takeover");
            // Until the new primary saw the old one gone: the rest of the
            // time to serving; then until the client's first write landed.
            let to_serving = serving.saturating_duration_since(killed).as_millis() as u64;
            let detect = to_serving.saturating_sub(wait + cas + fence + open);
            let first_write = first_new.0.saturating_duration_since(serving).as_millis();
            println!(
                "{k:>4} {old:>17} {:>17} {:>7} ms {detect:>6} ms {wait:>5} ms {cas:>4} ms {fence:>5} ms {open:>4} ms {first_write:>6} ms",
                first_new.1,
                took.as_millis()
            );
            // The killed node comes back as a backup; its lease must be live
            // (and the next primary's lease steady) before the next kill.
            nodes[i] = start(&node_args(root.path(), names[i], ports[i], &metadata), "serving gRPC on ");
            tokio::time::sleep(Duration::from_millis(2 * LEASE_TTL_MS)).await;
            // Discard the restarted node's log so far.
            let _ = nodes[i].lines.try_iter().count();
        }
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        // Every acknowledged write is there.
        let acks = std::mem::take(&mut *acks.lock().unwrap());
        for a in &acks {
            let req = GetRequest { shard_id: shard, client_id: "bench".into(), key: a.key.clone().into_bytes(), consistency: 0, max_staleness_ms: 0 };
            let r = c
                .call(CallSpec::shard(shard), |mut s| {
                    let r = req.clone();
                    async move { s.get(r).await }
                })
                .await
                .unwrap();
            assert!(r.value.found, "acknowledged key {} lost", a.key);
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_millis();
        println!(
            "failover (SIGKILL to the first write acknowledged by the new primary) over {} kills: p50 {} ms, p99 {} ms, max {} ms; {} acknowledged writes all read back",
            times.len(),
            at(0.5),
            at(0.99),
            times.last().unwrap().as_millis(),
            acks.len()
        );
    });
    drop(meta);
}
