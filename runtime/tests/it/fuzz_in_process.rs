//! Raw bytes through both gRPC services in process, at fuzzing rates: each
//! case is an HTTP/2 request as a client would send it (path, headers,
//! body), handed to the same tonic server `attache node` and `attache meta`
//! serve (`AttacheService::into_server`, `MetadataServer::into_server`,
//! each behind its `Authenticator`), with no socket in between. The node
//! runs on actix with `MemEngine` shards and an embedded metadata store in
//! memory; `attache meta`'s server has an embedded store of its own.
//!
//! What varies: the request bytes (`fuzz_api::raw_request`: arbitrary, or
//! a valid request with bytes flipped, cut off or appended); the gRPC frame
//! around them (well formed, flagged as compressed, a length that lies, no
//! frame, two frames); the `authorization` header (the caller's own token,
//! the server's other known caller's, none, or any printable text, `Bearer`
//! or not).
//!
//! Properties (`fuzz_api::checked_answer`): every call answers within
//! 10 s, with a `grpc-status`; never UNKNOWN; INTERNAL only for a request
//! that does not decode; every status has a message; a call is OK only
//! with a token that may make it (at `attache meta`, a node's), and a
//! request served names the caller's own client id; and afterwards both servers still take and serve
//! writes. Cases per method: `ATTACHE_FUZZ_CASES` (default 2,000: 44,000
//! calls over both servers).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_actors::auth::{token_hash, Authenticator, TokenFile, NODE_GROUP};
use attache_actors::lease::LeaseGate;
use attache_actors::local_store::MemLocalStore;
use attache_actors::mem_engine::MemEngineFactory;
use attache_actors::meta::embedded::MemMetaLog;
use attache_actors::meta::remote::MetadataServer;
use attache_actors::meta::{EmbeddedBackend, MetaOps};
use attache_actors::node::{Node, NodeConfig, NodeParts, ShutdownNode, WaitReady};
use attache_actors::retry::RetryPolicy;
use attache_actors::service::proto::{GetRequest, GetResponse, NewShardRequest, PutRequest, ShardInfo, ShardRef};
use attache_actors::service::AttacheService;
use attache_actors::HostHandle;
use attache_runtime::local_volumes::LocalVolumes;
use attache_runtime::ActixHost;
use futures::FutureExt as _;
use http_body_util::{BodyExt as _, Full};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use prost::Message as _;
use tonic::codegen::{http, Body, Bytes, Service};
use tonic::{Code, Status};

use crate::fuzz_api::{
    brief, call as generated_call, checked_answer, metadata_methods, node_methods, raw_request, Message, Method,
    Shards, OWNER,
};

/// The owner's token at the node; at `attache meta`, a node's.
const OWNER_TOKEN: &str = "fuzz-owner-token";
const NODE_TOKEN: &str = "fuzz-node-token";

/// How a case's bytes are put in the request body.
#[derive(Clone, Copy, Debug)]
enum Framing {
    /// One gRPC message: flag 0, the length (4 bytes, big-endian), the bytes.
    Frame,
    /// A frame flagged as compressed, which no server here accepts.
    Compressed,
    /// A frame whose length field is this, whatever the bytes' length.
    Length(u32),
    /// The bytes as the whole body, with no frame.
    Bare,
    /// The same frame twice: two messages on a call that takes one.
    Twice,
}

/// The `authorization` header of a case.
#[derive(Clone, Debug)]
enum Credential {
    /// `Bearer` and the token of the caller the server knows.
    Own,
    /// `Bearer` and the token of the server's other known caller: at the
    /// node, a storage node's (which may call ClusterStatus and nothing
    /// else there); at `attache meta`, the client's (which may call
    /// nothing).
    Other,
    /// No header.
    Absent,
    /// This text as the header.
    Header(String),
}

/// One generated call.
#[derive(Clone, Debug)]
struct Case {
    bytes: Vec<u8>,
    framing: Framing,
    credential: Credential,
}

fn case(valid: Vec<u8>) -> impl Strategy<Value = Case> {
    (raw_request(valid), wrapping()).prop_map(|(bytes, (framing, credential))| Case { bytes, framing, credential })
}

/// The framing and credential of a case: mostly a well-formed frame and
/// the caller's own token.
fn wrapping() -> impl Strategy<Value = (Framing, Credential)> {
    let framing = prop_oneof![
        12 => Just(Framing::Frame),
        1 => Just(Framing::Compressed),
        1 => prop_oneof![any::<u32>(), 0u32..200].prop_map(Framing::Length),
        1 => Just(Framing::Bare),
        1 => Just(Framing::Twice),
    ];
    let credential = prop_oneof![
        14 => Just(Credential::Own),
        1 => Just(Credential::Other),
        1 => Just(Credential::Absent),
        1 => prop_oneof!["[ -~]{0,40}", "[Bb]earer [ -~]{0,40}", Just(format!("Bearer {OWNER_TOKEN}x"))]
            .prop_map(Credential::Header),
    ];
    (framing, credential)
}

fn frame(flag: u8, len: u32, bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + bytes.len());
    b.push(flag);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(bytes);
    b
}

fn body(c: &Case) -> Bytes {
    let len = c.bytes.len() as u32;
    Bytes::from(match c.framing {
        Framing::Frame => frame(0, len, &c.bytes),
        Framing::Compressed => frame(1, len, &c.bytes),
        Framing::Length(n) => frame(0, n, &c.bytes),
        Framing::Bare => c.bytes.clone(),
        Framing::Twice => [frame(0, len, &c.bytes), frame(0, len, &c.bytes)].concat(),
    })
}

/// The token of the test's other caller than `token`'s (see
/// [`Credential::Other`]).
fn other_token(token: &str) -> &'static str {
    if token == OWNER_TOKEN {
        NODE_TOKEN
    } else {
        OWNER_TOKEN
    }
}

/// Whether a call to `path` with `credential` may be served: with the
/// caller's own token; with the other one only a node's ClusterStatus at
/// the node (`token`: the caller's own).
fn may_serve(credential: &Credential, path: &str, token: &str) -> bool {
    match credential {
        Credential::Own => true,
        Credential::Other => token == OWNER_TOKEN && path.ends_with("/ClusterStatus"),
        Credential::Absent | Credential::Header(_) => false,
    }
}

/// A gRPC call as HTTP: POST to `path` with `body`, from a caller with
/// `credential` (`token` being its own).
fn request(path: &str, body: Bytes, credential: &Credential, token: &str) -> http::Request<tonic::body::Body> {
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    match credential {
        Credential::Own => req = req.header("authorization", format!("Bearer {token}")),
        Credential::Other => req = req.header("authorization", format!("Bearer {}", other_token(token))),
        Credential::Absent => {}
        Credential::Header(h) => req = req.header("authorization", h.as_str()),
    }
    req.body(tonic::body::Body::new(Full::new(body))).expect("a valid HTTP request")
}

/// What a call answered: its status (OK with the messages it sent), or,
/// for `open_ended` (a watch that stays open), OK once it has answered
/// with headers and no status, after reading what is already there.
/// A response that ends without a `grpc-status` is UNKNOWN, which the
/// checks refuse.
async fn answer<B>(resp: http::Response<B>, open_ended: bool) -> Result<Vec<Bytes>, Status>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    if let Some(s) = Status::from_header_map(resp.headers()) {
        return if s.code() == Code::Ok { Ok(Vec::new()) } else { Err(s) };
    }
    let mut body = std::pin::pin!(resp.into_body());
    let mut messages = Vec::new();
    loop {
        let next = if open_ended {
            match body.frame().now_or_never() {
                Some(next) => next,
                None => return Ok(messages),
            }
        } else {
            body.frame().await
        };
        let frame = match next {
            None => return Err(Status::unknown("the response ended without a grpc-status")),
            Some(Err(e)) => return Err(Status::unknown(format!("the response body failed: {e:?}"))),
            Some(Ok(frame)) => frame,
        };
        match frame.into_trailers() {
            Ok(trailers) => {
                return match Status::from_header_map(&trailers) {
                    Some(s) if s.code() == Code::Ok => Ok(messages),
                    Some(s) => Err(s),
                    None => Err(Status::unknown("trailers without a grpc-status")),
                }
            }
            Err(frame) => {
                if let Ok(data) = frame.into_data() {
                    messages.push(data);
                }
            }
        }
    }
}

/// Calls `server` with `req`, within 10 s.
async fn call<S, B>(
    server: &S,
    req: http::Request<tonic::body::Body>,
    open_ended: bool,
    what: impl Fn() -> String,
) -> Result<Vec<Bytes>, Status>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut svc = server.clone();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.expect("the server is ready");
        let resp = svc.call(req).await.expect("tonic servers do not fail a call");
        answer(resp, open_ended).await
    });
    answered.await.unwrap_or_else(|_| panic!("no answer in 10 s to {}", what()))
}

/// A unary call of a valid `msg` as the caller of `token`; its one reply.
async fn unary<S, B, R>(server: &S, path: &str, msg: impl prost::Message, token: &str) -> R
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
    R: prost::Message + Default,
{
    let bytes = msg.encode_to_vec();
    let req = request(path, Bytes::from(frame(0, bytes.len() as u32, &bytes)), &Credential::Own, token);
    let messages = call(server, req, false, || path.to_string()).await.unwrap_or_else(|s| panic!("{path}: {s:?}"));
    let reply = messages.concat();
    R::decode(&reply[5..]).unwrap_or_else(|e| panic!("{path}: reply does not decode: {e}"))
}

/// Sends `cases` generated cases to each of `methods` of `server`, as the
/// caller of `token`. Returns answers by code, over all methods.
async fn raw_cases<S, B>(server: &S, methods: &[Method], token: &str, cases: usize) -> BTreeMap<String, usize>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut runner = TestRunner::deterministic();
    let mut by_code = BTreeMap::<String, usize>::new();
    for m in methods {
        let started = Instant::now();
        let strategy = case(m.valid.clone());
        for i in 0..cases {
            let c = strategy.new_tree(&mut runner).unwrap().current();
            let what = || brief(format!("{} case {i}: {c:02x?}", m.path));
            let req = request(m.path, body(&c), &c.credential, token);
            let result = call(server, req, m.streaming, what).await.map(drop);
            let code = checked_answer(&result, what);
            if !may_serve(&c.credential, m.path, token) {
                assert_ne!(code, Code::Ok, "served without a token that may call it: {}", what());
            }
            *by_code.entry(format!("{code:?}")).or_default() += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!("{}: {cases} cases in {secs:.1} s ({:.0}/s)", m.path, cases as f64 / secs);
    }
    by_code
}

/// Sends `cases` generated requests of every type (`fuzz_api::call`:
/// field values at, past and around their limits, other clients' ids,
/// shards that exist, were deleted or never were) to the node's `server`
/// as the owner, encoded, a quarter of them with 1 to 3 bytes flipped,
/// each framed and credentialed as [`wrapping`] draws. Beyond
/// [`checked_answer`]: an unflipped request naming another client on
/// the owner's shards is never OK, and some request of every method is.
/// Returns answers by code.
async fn generated_cases<S, B>(
    server: &S,
    shards: &mut Shards,
    runner: &mut TestRunner,
    cases: usize,
) -> BTreeMap<String, usize>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let flips = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    let strategy = (generated_call(), wrapping(), prop::option::weighted(0.25, flips));
    let mut by_code = BTreeMap::<String, usize>::new();
    let mut served = BTreeMap::<&str, usize>::new();
    let mut extra = std::collections::VecDeque::new();
    let started = Instant::now();
    for i in 0..cases {
        // A fresh main shard every 10,000 cases (the old one deleted):
        // its data grows with the generated puts (values up to 1 MiB), and
        // scans of it would grow with it.
        if i > 0 && i % 10_000 == 0 {
            let fresh: ShardInfo = unary(server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;
            delete_shard(server, std::mem::replace(&mut shards.main, fresh.shard_id)).await;
        }
        if i > 0 && i % 100_000 == 0 {
            eprintln!(
                "generated requests: {i} cases in {:.0} s; answers by code: {by_code:?}",
                started.elapsed().as_secs_f64()
            );
        }
        let (generated, (framing, credential), flips) = strategy.new_tree(runner).unwrap().current();
        let (message, foreign) = shards.message(generated);
        let (path, streaming, mut bytes) = message.encoded();
        for (at, x) in flips.iter().flatten() {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= x | 1;
            }
        }
        let c = Case { bytes, framing, credential };
        let what = || brief(format!("{path} generated case {i}: {message:?}, sent as {c:02x?}"));
        let req = request(path, body(&c), &c.credential, OWNER_TOKEN);
        let answered = call(server, req, streaming, what).await;
        let result = answered.as_ref().map(drop).map_err(Clone::clone);
        let code = checked_answer(&result, what);
        if code == Code::Ok {
            assert!(may_serve(&c.credential, path, OWNER_TOKEN), "served without a token that may call it: {}", what());
            assert!(!foreign || flips.is_some(), "a request naming another client was served: {}", what());
            // Whatever the flips did: a request served in one well-formed
            // frame named the caller's own client id.
            if matches!(c.framing, Framing::Frame | Framing::Twice) && !matches!(message, Message::ClusterStatus(_)) {
                let named = message.client_in(&c.bytes);
                assert_eq!(named.as_deref(), Some(OWNER), "served as another client: {}", what());
            }
            *served.entry(path).or_default() += 1;
            if matches!(message, Message::DeleteShard(_)) {
                let made: ShardInfo = unary(server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;
                shards.victim = made.shard_id;
            }
            // Shards the generated NewShards made: the oldest is deleted
            // past 64, so listing and placing them stays cheap over a
            // million cases.
            let reply = answered.as_deref().unwrap_or_default().concat();
            let made = reply.get(5..).and_then(|b| ShardInfo::decode(b).ok());
            if let (Message::NewShard(_), Some(info)) = (&message, made) {
                extra.push_back(info.shard_id);
                if extra.len() > 64 {
                    let oldest = extra.pop_front().expect("not empty");
                    delete_shard(server, oldest).await;
                }
            }
        }
        *by_code.entry(format!("{code:?}")).or_default() += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "generated requests: {cases} cases in {secs:.1} s ({:.0}/s); served by method: {served:?}",
        cases as f64 / secs
    );
    // Every client method (ClusterStatus is for operators and nodes).
    let unserved: Vec<&str> = node_methods(0)
        .iter()
        .map(|m| m.path)
        .filter(|p| !p.ends_with("/ClusterStatus") && !served.contains_key(p))
        .collect();
    assert!(unserved.is_empty(), "generated requests of {unserved:?} were never served, reaching past decoding");
    by_code
}

/// A NewShard request of the owner's.
fn own_shard() -> NewShardRequest {
    NewShardRequest { client_id: OWNER.into(), size_limit_bytes: 0 }
}

/// Deletes the owner's shard `shard_id` through `server`, if it is still
/// there (a generated request with flipped bytes may have deleted it).
async fn delete_shard<S, B>(server: &S, shard_id: u64)
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let gone = ShardRef { shard_id, client_id: OWNER.into() }.encode_to_vec();
    let body = Bytes::from(frame(0, gone.len() as u32, &gone));
    let req = request("/attache.v1.Attache/DeleteShard", body, &Credential::Own, OWNER_TOKEN);
    let deleted = call(server, req, false, || format!("delete shard {shard_id}")).await;
    assert!(
        deleted.as_ref().map_or_else(|s| s.code() == Code::NotFound, |_| true),
        "deleting shard {shard_id}: {deleted:?}"
    );
}

/// Most generated requests one node gets (see the test).
const GENERATED_PER_NODE: usize = 100_000;

/// A node as the test runs it: MemEngine shards on a local volume under
/// `dir`, an embedded metadata store in memory of its own, behind the
/// test's tokens; started, with its gRPC server.
async fn mem_node(
    host: &HostHandle,
    dir: &std::path::Path,
) -> (attache_actors::Addr<Node>, attache_actors::service::Server) {
    mem_node_with(host, dir, Arc::new(LocalVolumes::new(dir))).await
}

/// As [`mem_node`], its volumes attached and fenced by `provider` (local
/// volumes under `dir`, or a wrapper of them).
pub(crate) async fn mem_node_with(
    host: &HostHandle,
    dir: &std::path::Path,
    provider: Arc<dyn attache_actors::provider::VolumeProvider>,
) -> (attache_actors::Addr<Node>, attache_actors::service::Server) {
    let store = EmbeddedBackend::open(host, Arc::new(MemMetaLog::default())).await.unwrap();
    let cfg = NodeConfig::new("127.0.0.1:1", dir, vec!["vol-1".to_string()]);
    let parts = NodeParts {
        meta: MetaOps::new(store, RetryPolicy::default(), 1),
        local: Arc::new(MemLocalStore::default()),
        factory: Arc::new(MemEngineFactory::new()),
        provider,
        gate: Arc::new(LeaseGate::new(cfg.lease.clone())),
        claims: None,
    };
    let (node, server) = AttacheService::start(host, cfg, parts, tokens());
    node.send(WaitReady).await.unwrap().expect("the node starts");
    (node, server)
}

fn tokens() -> Authenticator {
    let text = format!("{} {OWNER} \n{} node-1 {NODE_GROUP}\n", token_hash(OWNER_TOKEN), token_hash(NODE_TOKEN));
    Authenticator::new(Some(TokenFile::parse(&text).expect("token file")), false)
}

#[actix_rt::test]
async fn raw_bytes_in_process_to_every_method_of_a_mem_engine_node_and_of_attache_meta() {
    let cases: usize = std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let dir = tempfile::tempdir().unwrap();
    let host = HostHandle::new(ActixHost::new(2));

    let (_node, server) = mem_node(&host, &dir.path().join("node-0")).await;
    let made: ShardInfo = unary(&server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;

    let started = Instant::now();
    let at_node = raw_cases(&server, &node_methods(made.shard_id), OWNER_TOKEN, cases).await;
    let calls = cases * 13;
    eprintln!("node: {calls} calls in {:.1} s; answers by code: {at_node:?}", started.elapsed().as_secs_f64());
    assert!(at_node.contains_key("Internal") && at_node.contains_key("Ok"), "the inputs reach both ends: {at_node:?}");

    // Generated requests, in runs of at most GENERATED_PER_NODE, each on a
    // node and metadata store of its own: ListShards reads every shard
    // record ever made (deleted shards' too), so on one node the calls
    // slow down as the run goes on (over 10 s each past ~950,000 cases,
    // on this machine, loaded).
    let mut runner = TestRunner::deterministic();
    let mut generated = BTreeMap::<String, usize>::new();
    let (total, mut done, mut run) = (cases * 13, 0, 0);
    while done < total {
        let n = GENERATED_PER_NODE.min(total - done);
        let fresh = if run == 0 { None } else { Some(mem_node(&host, &dir.path().join(format!("node-{run}"))).await) };
        let server = fresh.as_ref().map_or(&server, |(_, s)| s);
        // Fresh shards (on the first node, the raw cases ended by closing
        // and deleting the first one).
        let main: ShardInfo = unary(server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;
        let victim: ShardInfo = unary(server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;
        let mut shards = Shards { main: main.shard_id, victim: victim.shard_id };
        for (code, count) in generated_cases(server, &mut shards, &mut runner, n).await {
            *generated.entry(code).or_default() += count;
        }
        if let Some((node, _)) = fresh {
            node.send(ShutdownNode).await.expect("the node answers");
            node.stop();
        }
        (done, run) = (done + n, run + 1);
    }
    eprintln!("node: {total} generated requests on {run} nodes; answers by code: {generated:?}");

    // The node still takes and serves the owner's writes.
    let shard: ShardInfo = unary(&server, "/attache.v1.Attache/NewShard", own_shard(), OWNER_TOKEN).await;
    let put = PutRequest {
        shard_id: shard.shard_id,
        client_id: OWNER.into(),
        key: b"after".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let _: attache_actors::service::proto::WriteResponse =
        unary(&server, "/attache.v1.Attache/Put", put, OWNER_TOKEN).await;
    let get =
        GetRequest { shard_id: shard.shard_id, client_id: OWNER.into(), key: b"after".to_vec(), ..Default::default() };
    let got: GetResponse = unary(&server, "/attache.v1.Attache/Get", get, OWNER_TOKEN).await;
    assert!(got.found && got.value == b"v", "the node serves its writes after the fuzzing: {got:?}");

    // `attache meta`'s server, on a store of its own.
    let store = EmbeddedBackend::open(&host, Arc::new(MemMetaLog::default())).await.unwrap();
    let meta = MetadataServer::new(store.clone()).with_auth(tokens()).into_server();
    let started = Instant::now();
    let at_meta = raw_cases(&meta, &metadata_methods(), NODE_TOKEN, cases).await;
    let calls = cases * 9;
    eprintln!("attache meta: {calls} calls in {:.1} s; answers by code: {at_meta:?}", started.elapsed().as_secs_f64());
    assert!(at_meta.contains_key("Internal") && at_meta.contains_key("Ok"), "the inputs reach both ends: {at_meta:?}");
    use attache_actors::meta::remote::proto as m;
    let put = m::PutRequest { key: b"after".to_vec(), value: b"v".to_vec(), lease: 0 };
    let _: m::RevisionResponse = unary(&meta, "/attache.meta.v1.Metadata/Put", put, NODE_TOKEN).await;
    let got: m::GetResponse =
        unary(&meta, "/attache.meta.v1.Metadata/Get", m::KeyRequest { key: b"after".to_vec() }, NODE_TOKEN).await;
    assert_eq!(got.kv.map(|kv| kv.value), Some(b"v".to_vec()), "attache meta serves its writes after the fuzzing");
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string));
    eprintln!("peak resident memory of the test process: {}", peak.as_deref().unwrap_or("unknown"));
}
