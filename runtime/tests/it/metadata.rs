//! The metadata conformance suite (`attache_actors::meta::conformance`)
//! against the three backends: embedded (file log), embedded over gRPC (an
//! in-process `attache meta` server), and a real etcd server started here on
//! free loopback ports (Debian's `etcd-server`; set `ATTACHE_ETCD_BIN` to use
//! another binary).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use attache_actors::meta::conformance::{self, Harness};
use attache_actors::meta::embedded::EmbeddedBackend;
use attache_actors::meta::remote::{MetadataServer, RemoteBackend};
use attache_actors::meta::{MetaError, MetadataBackend};
use attache_actors::task_host::TaskHost;
use attache_actors::HostHandle;
use attache_runtime::etcd::EtcdBackend;
use attache_runtime::files::FileMetaLog;
use tokio_stream::wrappers::TcpListenerStream;

struct Embedded {
    dir: PathBuf,
    backend: Arc<dyn MetadataBackend>,
}

impl Embedded {
    async fn open(dir: &Path) -> Self {
        let backend = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(FileMetaLog::new(dir))).await.unwrap();
        Embedded { dir: dir.to_path_buf(), backend }
    }
}

#[async_trait]
impl Harness for Embedded {
    fn backend(&self) -> Arc<dyn MetadataBackend> {
        self.backend.clone()
    }
    async fn restart(&mut self) {
        *self = Embedded::open(&self.dir).await;
    }
    fn lease_ttl_ms(&self) -> u64 {
        // Real time: long enough that a loaded machine's stall between a
        // lease's grant and its first use does not expire it (300 ms did,
        // once, with a fuzzing run beside the tests).
        2000
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Embedded::open(dir.path()).await;
    conformance::run_all(&mut h, "/conformance").await;
}

/// An `attache meta` server in this process, restartable.
struct OverGrpc {
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    addr: SocketAddr,
}

impl OverGrpc {
    async fn start(dir: &Path) -> Self {
        let backend: Arc<dyn MetadataBackend> =
            EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(FileMetaLog::new(dir))).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(MetadataServer::new(backend).into_server())
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        OverGrpc { dir: dir.to_path_buf(), stop: Some(stop), server: Some(server), addr }
    }
}

#[async_trait]
impl Harness for OverGrpc {
    fn backend(&self) -> Arc<dyn MetadataBackend> {
        Arc::new(RemoteBackend::new(format!("http://{}", self.addr)))
    }
    async fn restart(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap();
        *self = OverGrpc::start(&self.dir).await;
    }
    fn lease_ttl_ms(&self) -> u64 {
        // Real time: long enough that a loaded machine's stall between a
        // lease's grant and its first use does not expire it (300 ms did,
        // once, with a fuzzing run beside the tests).
        2000
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_over_grpc_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OverGrpc::start(dir.path()).await;
    conformance::run_all(&mut h, "/conformance").await;
    let _ = h.stop.take().unwrap().send(());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// etcd's client TLS: its certificate and key, the CA of its clients'
/// certificates (`--client-cert-auth`), and what a client of it presents.
pub(crate) struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub client: attache_actors::tls::ClientTls,
}

/// An etcd server on free loopback ports, in a temporary data dir.
pub(crate) struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Child,
    tls: Option<EtcdTls>,
}

impl Etcd {
    fn binary() -> String {
        std::env::var("ATTACHE_ETCD_BIN").unwrap_or_else(|_| "etcd".into())
    }

    fn spawn(dir: &Path, client_port: u16, peer_port: u16, tls: Option<&EtcdTls>) -> Child {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(Self::binary());
        cmd.args(["--name", "attache-test", "--data-dir"])
            .arg(dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("attache-test={peer}"), "--log-level", "error"]);
        if let Some(tls) = tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(&tls.client_ca);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): install it (apt-get install etcd-server) or set ATTACHE_ETCD_BIN")
        })
    }

    /// Starts etcd on free loopback ports. A port found free may be taken
    /// by another process before etcd binds it; etcd then exits, and the
    /// start is tried again on other ports (up to 5 times).
    pub(crate) async fn start() -> Self {
        Self::start_with(None).await
    }

    /// As [`Etcd::start`], serving clients over mutual TLS when `tls` is given.
    pub(crate) async fn start_with(tls: Option<EtcdTls>) -> Self {
        let mut tls = tls;
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (client_port, peer_port) = (free_port(), free_port());
            let child = Self::spawn(dir.path(), client_port, peer_port, tls.as_ref());
            let mut etcd = Etcd { dir, client_port, peer_port, child, tls: tls.take() };
            if etcd.wait_ready().await {
                return etcd;
            }
            tls = etcd.tls.take();
        }
        panic!("etcd exited at start 5 times (ports taken?)");
    }

    /// Waits until etcd answers (true) or exits (false); panics after 30 s.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(b) = EtcdBackend::connect(&[self.endpoint()], self.client_tls()).await {
                if b.get(b"/ready").await.is_ok() {
                    return true;
                }
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "etcd did not answer on {} within 30 s", self.endpoint());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// What a client of this etcd presents (`None`: plaintext).
    pub(crate) fn client_tls(&self) -> Option<&attache_actors::tls::ClientTls> {
        self.tls.as_ref().map(|t| &t.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct EtcdHarness {
    etcd: Etcd,
    backend: Arc<dyn MetadataBackend>,
}

#[async_trait]
impl Harness for EtcdHarness {
    fn backend(&self) -> Arc<dyn MetadataBackend> {
        self.backend.clone()
    }
    async fn restart(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.etcd.child.id() as i32, libc::SIGTERM) };
        self.etcd.child.wait().unwrap();
        let etcd = &self.etcd;
        self.etcd.child = Etcd::spawn(etcd.dir.path(), etcd.client_port, etcd.peer_port, etcd.tls.as_ref());
        assert!(self.etcd.wait_ready().await, "etcd exited at restart on port {}", self.etcd.client_port);
        self.backend = Arc::new(EtcdBackend::connect(&[self.etcd.endpoint()], None).await.unwrap());
    }
    fn lease_ttl_ms(&self) -> u64 {
        // etcd's minimum TTL with default election timeouts is 2 s.
        2000
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_conforms() {
    let etcd = Etcd::start().await;
    let backend = Arc::new(EtcdBackend::connect(&[etcd.endpoint()], None).await.unwrap());
    let mut h = EtcdHarness { etcd, backend };
    conformance::run_all(&mut h, "/conformance").await;
}

/// A metadata store that accepts connections and never answers: a node's
/// calls to it still end, each within its deadline
/// (`attache_actors::meta::remote::CALL_TIMEOUT` for `attache meta`, 3 s
/// for etcd), as an error that says so, not a hang.
#[tokio::test]
async fn metadata_calls_to_a_store_that_never_answers_end_within_their_deadline() {
    use attache_actors::meta::remote::CALL_TIMEOUT;
    let silent = crate::common::Silent::start();
    let remote = RemoteBackend::new(silent.addr.clone());
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(30), remote.get(b"k")).await.expect("the call ended");
    let took = started.elapsed();
    assert!(matches!(got, Err(MetaError::Timeout(_))), "a silent store's call times out: {got:?}");
    assert!(took >= CALL_TIMEOUT, "it waited its deadline: {took:?}");
    assert!(took < CALL_TIMEOUT + Duration::from_secs(2), "attache meta call ended by its deadline: {took:?}, {got:?}");
    eprintln!("get from a silent attache meta: {got:?} after {took:?}");

    let started = Instant::now();
    let etcd = tokio::time::timeout(Duration::from_secs(30), async {
        let backend = EtcdBackend::connect(std::slice::from_ref(&silent.addr), None).await?;
        backend.get(b"k").await
    })
    .await
    .expect("the etcd connect or call ended");
    let took = started.elapsed();
    assert!(
        matches!(&etcd, Err(MetaError::Timeout(_) | MetaError::Unavailable(_))),
        "a silent etcd's connect or call fails as unavailable or timed out: {etcd:?}"
    );
    assert!(took >= Duration::from_secs(3), "it waited its deadline (3 s): {took:?}");
    assert!(took < Duration::from_secs(3 * 2 + 2), "etcd connect and call ended by their deadlines: {took:?}");
    eprintln!("get from a silent etcd: {etcd:?} after {took:?}");
    assert!(silent.stop() >= 2, "both reached the silent store");
}
