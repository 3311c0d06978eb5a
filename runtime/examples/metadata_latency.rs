//! Metadata operation latency, p50/p99/max of `get` and compare-and-swap, for
//! the embedded store (in process, fsynced log), the embedded store over
//! gRPC on loopback (`attache meta`), and a real etcd started here on free
//! loopback ports (skipped with a note when no `etcd` binary is found; set
//! `ATTACHE_ETCD_BIN` to choose one). One client, calls one at a time.
//!
//! Run: `cargo run -p attache-runtime --example metadata_latency [-- --ops 2000]`

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_actors::meta::backend::{Compare, CompareOp, MetadataBackend, Txn, TxnOp};
use attache_actors::meta::embedded::EmbeddedBackend;
use attache_actors::meta::remote::{MetadataServer, RemoteBackend};
use attache_actors::task_host::TaskHost;
use attache_actors::HostHandle;
use attache_runtime::etcd::EtcdBackend;
use attache_runtime::files::FileMetaLog;
use tokio_stream::wrappers::TcpListenerStream;

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    (at(0.50), at(0.99), v.last().unwrap().as_secs_f64() * 1e6)
}

async fn measure(name: &str, b: &dyn MetadataBackend, ops: usize) -> (String, (f64, f64, f64), (f64, f64, f64)) {
    let key = b"/bench/counter".to_vec();
    b.put(&key, b"0", 0).await.unwrap();
    let mut gets = Vec::with_capacity(ops);
    for _ in 0..ops {
        let t = Instant::now();
        b.get(&key).await.unwrap().unwrap();
        gets.push(t.elapsed());
    }
    let mut cas = Vec::with_capacity(ops);
    let mut rev = b.get(&key).await.unwrap().unwrap().mod_revision;
    for i in 0..ops {
        let txn = Txn {
            compare: vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)],
            success: vec![TxnOp::Put { key: key.clone(), value: i.to_string().into_bytes(), lease: 0 }],
            failure: vec![],
        };
        let t = Instant::now();
        let r = b.txn(txn).await.unwrap();
        cas.push(t.elapsed());
        assert!(r.succeeded, "uncontended CAS succeeds");
        rev = r.revision;
    }
    (name.to_string(), percentiles(gets), percentiles(cas))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ops: usize = std::env::args().skip_while(|a| a != "--ops").nth(1).map_or(1000, |s| s.parse().expect("--ops N"));
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let host = HostHandle::new(TaskHost);

    let embedded: Arc<dyn MetadataBackend> =
        EmbeddedBackend::open(&host, Arc::new(FileMetaLog::new(&dir.path().join("e")))).await.unwrap();
    rows.push(measure("embedded (in process)", &*embedded, ops).await);

    std::fs::create_dir_all(dir.path().join("g")).unwrap();
    let served: Arc<dyn MetadataBackend> =
        EmbeddedBackend::open(&host, Arc::new(FileMetaLog::new(&dir.path().join("g")))).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetadataServer::new(served).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let remote = RemoteBackend::new(format!("http://{addr}"));
    rows.push(measure("embedded over gRPC (attache meta)", &remote, ops).await);

    let etcd_bin = std::env::var("ATTACHE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let (cp, pp) = (free_port(), free_port());
    let (client, peer) = (format!("http://127.0.0.1:{cp}"), format!("http://127.0.0.1:{pp}"));
    let etcd = Command::new(&etcd_bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("bench={peer}"), "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match etcd {
        Err(e) => println!("etcd skipped: cannot start {etcd_bin:?} ({e})"),
        Ok(mut child) => {
            let endpoint = format!("127.0.0.1:{cp}");
            let mut backend = None;
            for _ in 0..300 {
                if let Ok(b) = EtcdBackend::connect(std::slice::from_ref(&endpoint), None).await {
                    if b.get(b"/x").await.is_ok() {
                        backend = Some(b);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let b = backend.expect("etcd answers within 30 s");
            rows.push(measure("etcd 3.x (one member, loopback)", &b, ops).await);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    println!("metadata latency, {ops} sequential calls each, microseconds (this machine, temp dir)");
    println!(
        "{:<36} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
        "backend", "get p50", "get p99", "get max", "CAS p50", "CAS p99", "CAS max"
    );
    for (name, g, c) in &rows {
        println!("{name:<36} {:>9.0} {:>9.0} {:>9.0}   {:>9.0} {:>9.0} {:>9.0}", g.0, g.1, g.2, c.0, c.1, c.2);
    }
}
