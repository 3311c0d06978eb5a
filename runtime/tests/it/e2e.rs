//! End-to-end tests of the real `attache` binary (`attache dev` on a free
//! loopback port) through the generated gRPC client: every operation, every
//! error status with a check that the rejected request changed nothing, and
//! crash/shutdown during a load with every acknowledged record back after a
//! restart.

use crate::common;

use std::sync::{Arc, Mutex};

use attache_actors::service::proto::attache_client::AttacheClient;
use attache_actors::service::proto::*;
use futures::TryStreamExt;
use tonic::transport::Channel;
use tonic::Code;

type C = AttacheClient<Channel>;

async fn new_shard(c: &mut C, client: &str, limit: u64) -> ShardInfo {
    c.new_shard(NewShardRequest { client_id: client.into(), size_limit_bytes: limit }).await.unwrap().into_inner()
}

async fn put(c: &mut C, shard: u64, client: &str, key: &[u8], value: &[u8]) -> Result<(), tonic::Status> {
    let req = PutRequest {
        shard_id: shard,
        client_id: client.into(),
        key: key.into(),
        value: value.into(),
        indexes: vec![],
        request_id: String::new(),
    };
    c.put(req).await.map(drop)
}

async fn get(c: &mut C, shard: u64, client: &str, key: &[u8]) -> Result<Option<Vec<u8>>, tonic::Status> {
    let req =
        GetRequest { shard_id: shard, client_id: client.into(), key: key.into(), consistency: 0, max_staleness_ms: 0 };
    let r = c.get(req).await?.into_inner();
    Ok(r.found.then_some(r.value))
}

async fn stats(c: &mut C, shard: u64, client: &str) -> ShardStatsResponse {
    c.shard_stats(ShardRef { shard_id: shard, client_id: client.into() }).await.unwrap().into_inner()
}

fn entry(k: &str, v: &str) -> Entry {
    Entry { key: k.into(), value: v.into(), indexes: vec![] }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(!s.message().is_empty(), "{what}: the status says what is wrong");
        }
        Ok(v) => panic!("{what}: expected {code:?}, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::start_dev(dir.path(), &[]);
    let mut c = p.client().await;

    // NewShard: active, on a volume, ids increase.
    let a = new_shard(&mut c, "alice", 0).await;
    assert_eq!(a.state, ShardState::Active as i32);
    assert_eq!(a.size_limit_bytes, 2 << 30);
    assert!(a.volume_id.starts_with("vol-"));
    let small = new_shard(&mut c, "alice", 2048).await;
    assert!(small.shard_id > a.shard_id, "shard ids increase");
    let s = a.shard_id;

    // Put with an index, Get, Delete.
    let req = PutRequest {
        shard_id: s,
        client_id: "alice".into(),
        key: b"k1".to_vec(),
        value: b"v1".to_vec(),
        indexes: vec![IndexEntry { name: "color".into(), value: b"red".to_vec() }],
        request_id: "put-k1-v1".into(),
    };
    c.put(req.clone()).await.unwrap();
    assert_eq!(get(&mut c, s, "alice", b"k1").await.unwrap(), Some(b"v1".to_vec()));
    // A retry of an applied write (its reply lost) applies nothing: another
    // writer's v2 stays.
    let v2 = PutRequest { value: b"v2".to_vec(), request_id: "put-k1-v2".into(), ..req.clone() };
    c.put(v2).await.unwrap();
    c.put(req.clone()).await.unwrap();
    assert_eq!(get(&mut c, s, "alice", b"k1").await.unwrap(), Some(b"v2".to_vec()));
    let v1_again = PutRequest { request_id: "put-k1-v1-again".into(), ..req.clone() };
    c.put(v1_again).await.unwrap();
    assert_eq!(get(&mut c, s, "alice", b"k1").await.unwrap(), Some(b"v1".to_vec()));
    let long_id = PutRequest { request_id: "x".repeat(65), ..req };
    let err = c.put(long_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("request id is 65 bytes"), "{err:?}");
    assert_eq!(get(&mut c, s, "alice", b"nope").await.unwrap(), None);
    put(&mut c, s, "alice", b"gone", b"x").await.unwrap();
    c.delete(DeleteRequest {
        shard_id: s,
        client_id: "alice".into(),
        key: b"gone".to_vec(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(get(&mut c, s, "alice", b"gone").await.unwrap(), None);

    // BatchPut (atomic), BatchGet (streamed, in request order).
    let entries: Vec<Entry> = (0..2500).map(|i| entry(&format!("b{i:05}"), &format!("v{i}"))).collect();
    c.batch_put(BatchPutRequest { shard_id: s, client_id: "alice".into(), entries, request_id: String::new() })
        .await
        .unwrap();
    let keys = vec![b"b00002".to_vec(), b"missing".to_vec(), b"b02499".to_vec()];
    let got: Vec<GetResponse> = c
        .batch_get(BatchGetRequest {
            shard_id: s,
            client_id: "alice".into(),
            keys,
            consistency: 0,
            max_staleness_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .try_collect()
        .await
        .unwrap();
    let got: Vec<(bool, Vec<u8>)> = got.into_iter().map(|r| (r.found, r.value)).collect();
    assert_eq!(got, vec![(true, b"v2".to_vec()), (false, vec![]), (true, b"v2499".to_vec())]);

    // Scan: all 2501 keys across pages, in order; a range; a limit.
    let scan = |start: &str, end: &str, limit| ScanRequest {
        shard_id: s,
        client_id: "alice".into(),
        start: start.into(),
        end: end.into(),
        limit,
        consistency: 0,
        max_staleness_ms: 0,
    };
    let pages: Vec<ScanResponse> = c.scan(scan("", "", 0)).await.unwrap().into_inner().try_collect().await.unwrap();
    let all: Vec<KeyValue> = pages.into_iter().flat_map(|p| p.entries).collect();
    assert_eq!(all.len(), 2501);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    let pages: Vec<ScanResponse> =
        c.scan(scan("b00010", "b00020", 0)).await.unwrap().into_inner().try_collect().await.unwrap();
    assert_eq!(pages.iter().map(|p| p.entries.len()).sum::<usize>(), 10);
    let pages: Vec<ScanResponse> = c.scan(scan("", "", 1500)).await.unwrap().into_inner().try_collect().await.unwrap();
    assert_eq!(pages.iter().map(|p| p.entries.len()).sum::<usize>(), 1500);
    // A stale scan pages the same way; each page says how old its view is
    // (0: this node is the primary).
    let stale = ScanRequest { consistency: 1, ..scan("", "", 0) };
    let pages: Vec<ScanResponse> = c.scan(stale).await.unwrap().into_inner().try_collect().await.unwrap();
    assert!(pages.len() >= 3, "{} pages", pages.len());
    assert_eq!(pages.iter().map(|p| p.entries.len()).sum::<usize>(), 2501);
    assert!(pages.iter().all(|p| p.max_staleness_ms == 0));
    // One that finds nothing still answers one (empty) page with its age.
    let nothing = ScanRequest { consistency: 1, ..scan("zz", "zzz", 0) };
    let pages: Vec<ScanResponse> = c.scan(nothing).await.unwrap().into_inner().try_collect().await.unwrap();
    assert_eq!(pages.len(), 1);
    assert!(pages[0].entries.is_empty());

    // ScanIndex.
    let req = ScanIndexRequest {
        shard_id: s,
        client_id: "alice".into(),
        name: "color".into(),
        value_prefix: b"re".to_vec(),
        limit: 0,
    };
    let hits: Vec<ScanIndexResponse> = c.scan_index(req).await.unwrap().into_inner().try_collect().await.unwrap();
    let hits: Vec<IndexHit> = hits.into_iter().flat_map(|h| h.hits).collect();
    assert_eq!(hits, vec![IndexHit { value: b"red".to_vec(), key: b"k1".to_vec() }]);

    // ShardStats, ListShards, ClusterStatus.
    let st = stats(&mut c, s, "alice").await;
    assert_eq!(st.live_keys, 2501);
    assert!(st.group_commits >= 3 && st.committed_ops >= 2503, "{st:?}");
    let list = c.list_shards(ListShardsRequest { client_id: "alice".into() }).await.unwrap().into_inner();
    assert_eq!(list.shards.iter().map(|s| s.shard_id).collect::<Vec<_>>(), vec![a.shard_id, small.shard_id]);
    let status = c.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.volumes.len(), 2);
    assert!(status.volumes.iter().all(|v| v.primary_node_id == status.nodes[0].node_id && v.epoch >= 1));

    // Every error: right code, and nothing changed.
    let before = stats(&mut c, s, "alice").await;
    assert_code(put(&mut c, s, "alice", b"", b"x").await, Code::InvalidArgument, "empty key");
    assert_code(put(&mut c, s, "alice", &[b'k'; 4097], b"x").await, Code::InvalidArgument, "key over 4 KiB");
    assert_code(
        put(&mut c, s, "alice", b"big", &vec![0; (1 << 20) + 1]).await,
        Code::InvalidArgument,
        "value over 1 MiB",
    );
    let too_many: Vec<Entry> = (0..10_001).map(|i| entry(&format!("t{i}"), "x")).collect();
    let r = c
        .batch_put(BatchPutRequest {
            shard_id: s,
            client_id: "alice".into(),
            entries: too_many,
            request_id: String::new(),
        })
        .await;
    assert_code(r, Code::InvalidArgument, "batch over 10,000 entries");
    let too_big: Vec<Entry> =
        (0..17).map(|i| Entry { key: format!("t{i}").into(), value: vec![1; 1 << 20], indexes: vec![] }).collect();
    let r = c
        .batch_put(BatchPutRequest {
            shard_id: s,
            client_id: "alice".into(),
            entries: too_big,
            request_id: String::new(),
        })
        .await;
    assert_code(r, Code::InvalidArgument, "batch over 16 MiB");
    // Past the decode limit (twice the batch limit plus 1 MiB: 33 MiB), the
    // request is refused before it is decoded, with the limit named; the
    // node serves on (the get after the empty batch below).
    let past_decode: Vec<Entry> =
        (0..34).map(|i| Entry { key: format!("d{i}").into(), value: vec![1; 1 << 20], indexes: vec![] }).collect();
    let r = c
        .batch_put(BatchPutRequest {
            shard_id: s,
            client_id: "alice".into(),
            entries: past_decode,
            request_id: String::new(),
        })
        .await;
    let e = r.expect_err("a request past the decode limit is refused");
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted)
            && e.message().contains(&(33u64 << 20).to_string()),
        "refused with the limit named: {e:?}"
    );
    let r = c
        .batch_put(BatchPutRequest {
            shard_id: s,
            client_id: "alice".into(),
            entries: vec![],
            request_id: String::new(),
        })
        .await;
    assert_code(r, Code::InvalidArgument, "empty batch");
    let r = c.new_shard(NewShardRequest { client_id: String::new(), size_limit_bytes: 0 }).await;
    assert_code(r, Code::InvalidArgument, "empty client id");
    assert_code(put(&mut c, 999_999, "alice", b"k", b"v").await, Code::NotFound, "unknown shard");
    assert_code(get(&mut c, 999_999, "alice", b"k").await, Code::NotFound, "get from unknown shard");
    assert_code(put(&mut c, s, "mallory", b"k1", b"evil").await, Code::PermissionDenied, "put by another client");
    assert_code(get(&mut c, s, "mallory", b"k1").await, Code::PermissionDenied, "get by another client");
    let r = c.delete_shard(ShardRef { shard_id: s, client_id: "mallory".into() }).await;
    assert_code(r, Code::PermissionDenied, "delete by another client");
    let after = stats(&mut c, s, "alice").await;
    assert_eq!(
        (after.live_keys, after.live_bytes),
        (before.live_keys, before.live_bytes),
        "rejected requests changed nothing"
    );
    assert_eq!(get(&mut c, s, "alice", b"k1").await.unwrap(), Some(b"v1".to_vec()));
    assert_eq!(get(&mut c, s, "alice", b"t0").await.unwrap(), None);

    // The size limit.
    let mut n = 0;
    let full = loop {
        match put(&mut c, small.shard_id, "alice", format!("f{n:03}").as_bytes(), &[7; 100]).await {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 100, "a 2048-byte shard took 100 puts of 100 bytes");
    };
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(get(&mut c, small.shard_id, "alice", format!("f{n:03}").as_bytes()).await.unwrap(), None);
    assert_eq!(stats(&mut c, small.shard_id, "alice").await.live_keys, n);

    // Close: writes rejected, reads served; delete: gone.
    let closed = c.close_shard(ShardRef { shard_id: s, client_id: "alice".into() }).await.unwrap().into_inner();
    assert_eq!(closed.state, ShardState::ReadOnly as i32);
    assert_code(put(&mut c, s, "alice", b"late", b"x").await, Code::FailedPrecondition, "put to a closed shard");
    assert_eq!(get(&mut c, s, "alice", b"late").await.unwrap(), None);
    assert_eq!(get(&mut c, s, "alice", b"k1").await.unwrap(), Some(b"v1".to_vec()));
    let deleted = c.delete_shard(ShardRef { shard_id: s, client_id: "alice".into() }).await.unwrap().into_inner();
    assert_eq!(deleted.state, ShardState::Deleted as i32);
    assert_code(get(&mut c, s, "alice", b"k1").await, Code::NotFound, "get from a deleted shard");
    assert_code(put(&mut c, s, "alice", b"k1", b"x").await, Code::NotFound, "put to a deleted shard");
    let list = c.list_shards(ListShardsRequest { client_id: "alice".into() }).await.unwrap().into_inner();
    assert_eq!(list.shards.iter().map(|s| s.shard_id).collect::<Vec<_>>(), vec![small.shard_id]);

    // Still serving.
    assert_eq!(get(&mut c, small.shard_id, "alice", b"f000").await.unwrap(), Some(vec![7; 100]));
}

/// Loads batches from 4 concurrent loaders until `kill` acked batches, then
/// sends `signal`; returns the acknowledged keys.
async fn load_until_signal(
    p: &mut common::Proc,
    shard: u64,
    kill_after: usize,
    signal: i32,
) -> (Vec<Vec<u8>>, std::process::ExitStatus) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let loaders: Vec<_> = (0..4)
        .map(|l| {
            let acked = acked.clone();
            let addr = p.addr.clone();
            tokio::spawn(async move {
                let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
                let mut c = AttacheClient::new(ch);
                for b in 0..10_000 {
                    let keys: Vec<Vec<u8>> = (0..200).map(|i| format!("l{l}-b{b:05}-{i:03}").into_bytes()).collect();
                    let entries =
                        keys.iter().map(|k| Entry { key: k.clone(), value: k.repeat(3), indexes: vec![] }).collect();
                    match c
                        .batch_put(BatchPutRequest {
                            shard_id: shard,
                            client_id: "loader".into(),
                            entries,
                            request_id: String::new(),
                        })
                        .await
                    {
                        Ok(_) => acked.lock().unwrap().extend(keys),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while acked.lock().unwrap().len() < kill_after * 200 {
        assert!(std::time::Instant::now() < deadline, "load too slow");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let status = p.signal_and_wait(signal).await;
    for l in loaders {
        l.await.unwrap();
    }
    let keys = acked.lock().unwrap().clone();
    (keys, status)
}

/// Every acknowledged key is present with its value.
async fn check_all_present(c: &mut C, shard: u64, keys: &[Vec<u8>]) {
    for chunk in keys.chunks(5000) {
        let req = BatchGetRequest {
            shard_id: shard,
            client_id: "loader".into(),
            keys: chunk.to_vec(),
            consistency: 0,
            max_staleness_ms: 0,
        };
        let got: Vec<GetResponse> = c.batch_get(req).await.unwrap().into_inner().try_collect().await.unwrap();
        for r in got {
            assert!(r.found, "acknowledged key {} lost", String::from_utf8_lossy(&r.key));
            assert_eq!(r.value, r.key.repeat(3));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = common::start_dev(dir.path(), &[]);
    let shard = new_shard(&mut p.client().await, "loader", 0).await.shard_id;
    let (acked, _) = load_until_signal(&mut p, shard, 60, libc::SIGKILL).await;
    drop(p);
    let p = common::start_dev(dir.path(), &[]);
    let mut c = p.client().await;
    check_all_present(&mut c, shard, &acked).await;
    let st = stats(&mut c, shard, "loader").await;
    assert!(st.live_keys >= acked.len() as u64, "{} keys for {} acknowledged", st.live_keys, acked.len());
    eprintln!("SIGKILL: {} acknowledged records, {} present after restart", acked.len(), st.live_keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_writes_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = common::start_dev(dir.path(), &[]);
    let shard = new_shard(&mut p.client().await, "loader", 0).await.shard_id;
    let (acked, status) = load_until_signal(&mut p, shard, 30, libc::SIGTERM).await;
    assert!(status.success(), "attache exits 0 on SIGTERM: {status:?}");
    drop(p);
    let p = common::start_dev(dir.path(), &[]);
    check_all_present(&mut p.client().await, shard, &acked).await;
}

/// `GET path` on `addr` over plain HTTP/1.0; the response body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_shard_io_latency_and_lease() {
    let dir = tempfile::tempdir().unwrap();
    // A port found free may be taken before the node binds it: then the
    // node exits, and the test tries other ports.
    let (p, metrics) = (0..5)
        .find_map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let metrics = format!("127.0.0.1:{port}");
            let args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()];
            let args = [&args[..], &["--metrics-listen", &metrics]].concat();
            common::try_start(&args, "serving gRPC on ").map(|p| (p, metrics))
        })
        .expect("attache dev with a metrics endpoint did not start on 5 free ports");
    let mut c = p.client().await;
    let s = new_shard(&mut c, "m", 0).await.shard_id;
    put(&mut c, s, "m", b"k", b"v").await.unwrap();
    assert_eq!(get(&mut c, s, "m", b"k").await.unwrap(), Some(b"v".to_vec()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let body = http_get(&metrics, "/metrics");
        if body.contains("attache_lease_valid") || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for metric in [
        "attache_shard_ops_written_total",
        "attache_shard_bytes_written_total",
        "attache_shard_ops_read_total",
        "attache_shard_live_bytes",
        "attache_request_duration_seconds_bucket",
        "attache_group_commit_ops_bucket",
        "attache_lease_valid",
    ] {
        assert!(body.contains(metric), "/metrics lacks {metric}:\n{body}");
    }
    assert!(body.contains(&format!("shard=\"{s}\"")), "per-shard labels");
}

/// At start a node raises its soft open-file limit to the hard limit, says
/// how many shards that leaves room for, and keeps that many open at most
/// (`max_open_shards`' default).
#[test]
fn a_node_raises_its_open_file_limit_and_says_so() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 512 && exec '{}' dev --listen 127.0.0.1:0 --data-dir '{}'",
            env!("CARGO_BIN_EXE_attache"),
            dir.path().display()
        ))
        .env("ATTACHE_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The lines come first; give up after 6 lines or 60 s.
    let lines: Vec<String> = (0..6).map_while(|_| rx.recv_timeout(std::time::Duration::from_secs(60)).ok()).collect();
    let _ = child.kill();
    let _ = child.wait();
    let expected = hard.map_or("unlimited".to_string(), |h| h.to_string());
    assert!(lines.iter().any(|l| l.contains(&format!("open files: soft limit {expected} (was 512)"))), "{lines:?}");
    // 256 files for the process, one per connection it may hold, 8 per shard.
    let connections = attache_runtime::serve::DEFAULT_MAX_CONNECTIONS as u64;
    let room = hard.map_or("0".to_string(), |h| ((h - 256 - connections) / 8).to_string());
    assert!(lines.iter().any(|l| l.contains(&format!("room for {room} open shards per node"))), "{lines:?}");
}
