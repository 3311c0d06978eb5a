//! Failover with real processes: one `attache meta` and three `attache node`
//! processes sharing a volume root on local directories (vol-1 attached by
//! all three), a client loading batches through a retrying client that
//! follows primary hints. (a) The primary is killed with SIGKILL: a backup
//! takes over and no acknowledged write is lost. (b) The primary is stopped
//! with SIGSTOP past its lease and resumed with SIGCONT: no acknowledged
//! write is lost, the old primary acknowledges nothing after it resumes, and
//! service goes on. Each prints its failover time (last acknowledgement by
//! the old primary to the first by the new one).

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attache_actors::client::{CallSpec, Client, ClientSettings};
use attache_actors::service::proto::{BatchGetRequest, BatchPutRequest, Entry, GetResponse, NewShardRequest};
use futures::TryStreamExt;

const LEASE_TTL_MS: &str = "2000";

struct Cluster {
    _meta: common::Proc,
    nodes: Vec<common::Proc>,
}

fn start_cluster(root: &Path) -> Cluster {
    let meta = common::start_meta(&root.join("meta"));
    let metadata = format!("grpc://{}", meta.addr);
    // Started one by one, so the first is the primary of vol-1.
    let nodes = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| common::start_node(root, n, "vol-1", &metadata, &["--lease-ttl-ms", LEASE_TTL_MS]))
        .collect();
    Cluster { _meta: meta, nodes }
}

/// One acknowledged batch: its keys, when it was sent and acknowledged, and
/// which node acknowledged it.
struct Ack {
    keys: Vec<Vec<u8>>,
    sent: Instant,
    at: Instant,
    by: String,
}

/// Loads batches of 50 records until `stop`, recording every acknowledgement.
async fn loader(c: Client, shard: u64, acks: Arc<Mutex<Vec<Ack>>>, stop: Arc<AtomicBool>) {
    for b in 0..100_000u32 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let keys: Vec<Vec<u8>> = (0..50).map(|i| format!("b{b:06}-{i:02}").into_bytes()).collect();
        let entries: Vec<Entry> =
            keys.iter().map(|k| Entry { key: k.clone(), value: k.repeat(2), indexes: vec![] }).collect();
        let req = BatchPutRequest { shard_id: shard, client_id: "loader".into(), entries, request_id: String::new() };
        let sent = Instant::now();
        let result = c
            .call(CallSpec::shard(shard), |mut c| {
                let r = req.clone();
                async move { c.batch_put(r).await }
            })
            .await;
        match result {
            Ok(served) => acks.lock().unwrap().push(Ack { keys, sent, at: Instant::now(), by: served.addr }),
            Err(f) => eprintln!("batch {b} not acknowledged: {f:?}"),
        }
    }
}

fn count(acks: &Mutex<Vec<Ack>>, pred: impl Fn(&Ack) -> bool) -> usize {
    acks.lock().unwrap().iter().filter(|a| pred(a)).count()
}

async fn wait_for(what: &str, deadline: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "{what} did not happen within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acknowledged key is there with its value.
async fn check_all_present(c: &Client, shard: u64, acks: &[Ack]) {
    let keys: Vec<Vec<u8>> = acks.iter().flat_map(|a| a.keys.clone()).collect();
    for chunk in keys.chunks(5000) {
        let req = BatchGetRequest {
            shard_id: shard,
            client_id: "loader".into(),
            keys: chunk.to_vec(),
            consistency: 0,
            max_staleness_ms: 0,
        };
        let stream = c
            .call(CallSpec::shard(shard), |mut c| {
                let r = req.clone();
                async move { c.batch_get(r).await }
            })
            .await
            .unwrap()
            .value;
        let got: Vec<GetResponse> = stream.try_collect().await.unwrap();
        for r in got {
            assert!(r.found, "acknowledged key {} lost", String::from_utf8_lossy(&r.key));
            assert_eq!(r.value, r.key.repeat(2));
        }
    }
}

/// What happens to the primary.
enum Fault {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT after this long.
    StopFor(Duration),
}

/// Runs the load, applies `fault` to the primary once 20 batches are in (it
/// is over at once for SIGKILL, at SIGCONT for a stop), waits for 20
/// batches acknowledged by another node, and checks.
/// Returns the failover time (last acknowledgement by the old primary before
/// the fault to the first by another node), the records acknowledged, and
/// the batches the old primary acknowledged that were sent after the fault.
async fn failover(fault: Fault) -> (Duration, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_cluster(dir.path());
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let settings = ClientSettings { deadline_ms: 60_000, ..ClientSettings::default() };
    let c = Client::new(&addrs, settings).unwrap();
    let shard = c
        .call(CallSpec::any().once().starting_at(0), |mut c| async move {
            c.new_shard(NewShardRequest { client_id: "loader".into(), size_limit_bytes: 0 }).await
        })
        .await
        .unwrap()
        .value;
    assert_eq!(shard.volume_id, "vol-1");
    let primary = addrs[0].clone();
    let (acks, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
    let load = tokio::spawn(loader(c.clone(), shard.shard_id, acks.clone(), stop.clone()));
    wait_for("20 batches on the primary", Duration::from_secs(60), || count(&acks, |a| a.by == primary) >= 20).await;
    let before = Instant::now();
    let p = &mut cluster.nodes[0];
    let pid = p.child.id() as i32;
    let faulted_at = match fault {
        Fault::Kill => {
            let _ = p.child.kill(); // SIGKILL
            let _ = p.child.wait();
            Instant::now()
        }
        Fault::StopFor(stopped) => {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            tokio::time::sleep(stopped).await;
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            Instant::now()
        }
    };
    wait_for("20 batches on a new primary", Duration::from_secs(90), || count(&acks, |a| a.by != primary) >= 20).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let last_old = acks.iter().filter(|a| a.by == primary && a.at <= before).map(|a| a.at).max().unwrap();
    let first_new = acks.iter().filter(|a| a.by != primary).map(|a| a.at).min().unwrap();
    // A batch sent before the fault may be acknowledged after it (it was
    // durable before); one sent after the fault must not be acknowledged by
    // the old primary.
    let late = acks.iter().filter(|a| a.by == primary && a.sent > faulted_at).count();
    check_all_present(&c, shard.shard_id, &acks).await;
    (first_new.saturating_duration_since(last_old), acks.len() * 50, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_primary_fails_over_without_losing_acknowledged_writes() {
    let (took, records, _) = failover(Fault::Kill).await;
    eprintln!(
        "SIGKILL failover: {} ms (lease TTL {LEASE_TTL_MS} ms); {records} acknowledged records all present",
        took.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_lease_then_sigcont_loses_nothing_and_the_old_primary_takes_no_new_write() {
    let stopped = Duration::from_millis(4 * LEASE_TTL_MS.parse::<u64>().unwrap() / 2);
    let (took, records, late) = failover(Fault::StopFor(stopped)).await;
    assert_eq!(late, 0, "the old primary acknowledged writes sent after it resumed");
    eprintln!(
        "SIGSTOP/SIGCONT failover: {} ms (lease TTL {LEASE_TTL_MS} ms, stopped {} ms); {records} acknowledged records all present",
        took.as_millis(),
        2 * LEASE_TTL_MS.parse::<u64>().unwrap()
    );
}
