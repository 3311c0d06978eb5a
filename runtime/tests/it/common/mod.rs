//! Helpers for tests that run the real `attache` binary: start a process,
//! wait for the line that says where it listens, stop or kill it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use attache_actors::service::proto::attache_client::AttacheClient;
use tonic::transport::Channel;

/// A running `attache` process.
pub struct Proc {
    pub child: Child,
    /// The address it printed (`... on ADDR ...`).
    pub addr: String,
    /// Every stdout line it printed after the address line.
    pub lines: mpsc::Receiver<String>,
}

/// Starts `attache` with `args` and waits (up to 120 s) for a stdout line
/// containing `marker` followed by an address.
pub fn start(args: &[&str], marker: &str) -> Proc {
    try_start(args, marker).unwrap_or_else(|| panic!("attache {args:?} exited before printing {marker:?}"))
}

/// As [`start`], but `None` when the process exits before printing `marker`
/// (e.g. a port found free was taken before it bound it).
pub fn try_start(args: &[&str], marker: &str) -> Option<Proc> {
    let child = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(args)
        .env("ATTACHE_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start attache");
    let (tx, rx) = mpsc::channel();
    // From here on, Drop kills and reaps the child whatever happens.
    let mut proc = Proc { child, addr: String::new(), lines: rx };
    let stdout = proc.child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match proc.lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("attache {args:?} printed no {marker:?} line in 120 s"),
        };
        if let Some(rest) = line.split(marker).nth(1) {
            proc.addr = rest.split_whitespace().next().unwrap().to_string();
            return Some(proc);
        }
    }
}

/// Starts `attache dev` on a free port with its data in `dir`.
pub fn start_dev(dir: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    start(&args, "serving gRPC on ")
}

/// Starts `attache meta` on a free port with its data in `dir`.
pub fn start_meta(dir: &Path) -> Proc {
    start(&["meta", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()], "serving gRPC on ")
}

/// Starts `attache node` on a free port: data dir `{root}/{name}`, volumes
/// (comma-separated) under `{root}/volumes`, metadata `metadata`, and `extra` flags.
pub fn start_node(root: &Path, name: &str, volumes: &str, metadata: &str, extra: &[&str]) -> Proc {
    start_node_at(root, name, &root.join("volumes"), volumes, metadata, extra)
}

/// As [`start_node`], with the volumes under `volume_root`.
pub fn start_node_at(
    root: &Path,
    name: &str,
    volume_root: &Path,
    volumes: &str,
    metadata: &str,
    extra: &[&str],
) -> Proc {
    let data = root.join(name);
    let mut args = vec![
        "node",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--volume-root",
        volume_root.to_str().unwrap(),
        "--volumes",
        volumes,
        "--metadata",
        metadata,
    ];
    args.extend_from_slice(extra);
    start(&args, "serving gRPC on ")
}

impl Proc {
    /// Sends `signal` and waits for the exit status (up to 60 s), polling
    /// without blocking the async runtime.
    pub async fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "attache did not exit within 60 s of signal {signal}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A gRPC client of this process.
    pub async fn client(&self) -> AttacheClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        AttacheClient::new(ch)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server on a free loopback port that accepts connections and never
/// answers (reads nothing, writes nothing): what a hung peer looks like.
/// It holds at most 100 connections and stops when dropped, or after 60 s.
pub struct Silent {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: Option<std::thread::JoinHandle<usize>>,
}

impl Silent {
    pub fn start() -> Silent {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let held = std::thread::spawn(move || {
            let mut held = Vec::new();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < until && !stopped.load(Ordering::Relaxed) && held.len() < 100 {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            held.len()
        });
        Silent { addr, stop, held: Some(held) }
    }

    /// Stops it; how many connections it was sent.
    pub fn stop(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.held.take().expect("running").join().unwrap()
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
