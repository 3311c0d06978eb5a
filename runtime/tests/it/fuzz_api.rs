//! Fuzzing of the gRPC API of the real binary (`attache dev`, RocksDB):
//! requests of every type with generated field values. Shard ids exist, are
//! 0, or were never made; client ids are the owner's, another's, empty or
//! too long; keys, values, index entries and request ids are empty, binary,
//! at their limits or one past; batches hold duplicates; scans have
//! reversed or empty ranges and any limit; staleness is any number.
//!
//! Properties: every call answers within 10 s, either OK or with a status
//! whose code is neither INTERNAL nor UNKNOWN and whose message is not empty
//! (a person can act on it); a call naming another client's id never
//! succeeds on the owner's shard; after all of it the node still takes and
//! serves the owner's writes. Cases: `ATTACHE_FUZZ_CASES` (default 300:
//! each case is one call over the network).

use crate::common;

use attache_actors::service::proto::attache_client::AttacheClient;
use attache_actors::service::proto::*;
use futures::StreamExt as _;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tonic::transport::Channel;
use tonic::Code;

/// The owner of the shards the calls go to.
pub(crate) const OWNER: &str = "fuzz-owner";

fn client_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(OWNER.to_string()),
        1 => Just("mallory".to_string()),
        1 => Just(String::new()),
        1 => Just("c".repeat(300)),
        1 => "\\PC{0,12}",
    ]
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 1..16),
        1 => Just(Vec::new()),
        1 => Just(vec![b'k'; 4096]),
        1 => Just(vec![b'k'; 4097]),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(vec![b'v'; 1 << 20]),
        1 => Just(vec![b'v'; (1 << 20) + 1]),
    ]
}

fn request_id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[0-9a-f]{32}", Just("r".repeat(65)), "\\PC{0,8}"]
}

fn indexes() -> impl Strategy<Value = Vec<IndexEntry>> {
    let name = prop_oneof![4 => "[a-z]{1,8}", 1 => Just(String::new()), 1 => Just("n".repeat(257))];
    let entry =
        (name, proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(name, value)| IndexEntry { name, value });
    prop_oneof![
        4 => proptest::collection::vec(entry.clone(), 0..3),
        1 => proptest::collection::vec(entry, 17..18),
    ]
}

/// One generated call; `shard` picks the shard id (see [`Shards::shard_id`]).
#[derive(Clone, Debug)]
pub(crate) enum Call {
    NewShard { client: String, size_limit: u64 },
    Put { shard: u8, client: String, key: Vec<u8>, value: Vec<u8>, indexes: Vec<IndexEntry>, request_id: String },
    BatchPut { shard: u8, client: String, entries: Vec<(Vec<u8>, Vec<u8>)>, request_id: String },
    Delete { shard: u8, client: String, key: Vec<u8>, request_id: String },
    Get { shard: u8, client: String, key: Vec<u8>, stale: u64 },
    BatchGet { shard: u8, client: String, keys: Vec<Vec<u8>>, stale: u64 },
    Scan { shard: u8, client: String, start: Vec<u8>, end: Vec<u8>, limit: u64, stale: u64 },
    ScanIndex { shard: u8, client: String, name: String, prefix: Vec<u8>, limit: u64 },
    Stats { shard: u8, client: String },
    ListShards { client: String },
    ClusterStatus,
    CloseShard { client: String },
    DeleteShard { client: String },
}

pub(crate) fn call() -> impl Strategy<Value = Call> {
    let shard = any::<u8>();
    let stale = prop_oneof![Just(0u64), any::<u64>(), 1u64..10_000];
    let limit = prop_oneof![Just(0u64), 1u64..20, any::<u64>()];
    prop_oneof![
        (client_id(), any::<u64>()).prop_map(|(client, size_limit)| Call::NewShard { client, size_limit }),
        (shard, client_id(), key(), value(), indexes(), request_id()).prop_map(
            |(shard, client, key, value, indexes, request_id)| Call::Put {
                shard,
                client,
                key,
                value,
                indexes,
                request_id
            }
        ),
        (shard, client_id(), proptest::collection::vec((key(), value()), 0..4), request_id())
            .prop_map(|(shard, client, entries, request_id)| Call::BatchPut { shard, client, entries, request_id }),
        (shard, client_id(), key(), request_id()).prop_map(|(shard, client, key, request_id)| Call::Delete {
            shard,
            client,
            key,
            request_id
        }),
        (shard, client_id(), key(), stale.clone()).prop_map(|(shard, client, key, stale)| Call::Get {
            shard,
            client,
            key,
            stale
        }),
        (shard, client_id(), proptest::collection::vec(key(), 0..5), stale.clone())
            .prop_map(|(shard, client, keys, stale)| Call::BatchGet { shard, client, keys, stale }),
        (shard, client_id(), key(), key(), limit.clone(), stale).prop_map(
            |(shard, client, start, end, limit, stale)| Call::Scan { shard, client, start, end, limit, stale }
        ),
        (shard, client_id(), "[a-z]{0,4}", proptest::collection::vec(any::<u8>(), 0..4), limit)
            .prop_map(|(shard, client, name, prefix, limit)| Call::ScanIndex { shard, client, name, prefix, limit }),
        (shard, client_id()).prop_map(|(shard, client)| Call::Stats { shard, client }),
        client_id().prop_map(|client| Call::ListShards { client }),
        Just(Call::ClusterStatus),
        client_id().prop_map(|client| Call::CloseShard { client }),
        client_id().prop_map(|client| Call::DeleteShard { client }),
    ]
}

/// The request of a generated call, typed.
#[derive(Clone, Debug)]
pub(crate) enum Message {
    NewShard(NewShardRequest),
    Put(PutRequest),
    BatchPut(BatchPutRequest),
    Delete(DeleteRequest),
    Get(GetRequest),
    BatchGet(BatchGetRequest),
    Scan(ScanRequest),
    ScanIndex(ScanIndexRequest),
    Stats(ShardRef),
    ListShards(ListShardsRequest),
    ClusterStatus(ClusterStatusRequest),
    CloseShard(ShardRef),
    DeleteShard(ShardRef),
}

impl Message {
    /// The method's path, whether it answers with a stream, and the
    /// request encoded: what a client sends.
    pub(crate) fn encoded(&self) -> (&'static str, bool, Vec<u8>) {
        use prost::Message as _;
        let (path, streaming, bytes) = match self {
            Message::NewShard(r) => ("NewShard", false, r.encode_to_vec()),
            Message::Put(r) => ("Put", false, r.encode_to_vec()),
            Message::BatchPut(r) => ("BatchPut", false, r.encode_to_vec()),
            Message::Delete(r) => ("Delete", false, r.encode_to_vec()),
            Message::Get(r) => ("Get", false, r.encode_to_vec()),
            Message::BatchGet(r) => ("BatchGet", true, r.encode_to_vec()),
            Message::Scan(r) => ("Scan", true, r.encode_to_vec()),
            Message::ScanIndex(r) => ("ScanIndex", true, r.encode_to_vec()),
            Message::Stats(r) => ("ShardStats", false, r.encode_to_vec()),
            Message::ListShards(r) => ("ListShards", false, r.encode_to_vec()),
            Message::ClusterStatus(r) => ("ClusterStatus", false, r.encode_to_vec()),
            Message::CloseShard(r) => ("CloseShard", false, r.encode_to_vec()),
            Message::DeleteShard(r) => ("DeleteShard", false, r.encode_to_vec()),
        };
        let path = node_methods(0).into_iter().find(|m| m.path.ends_with(&format!("/{path}"))).expect("a method").path;
        (path, streaming, bytes)
    }
}

impl Message {
    /// The client id in `bytes` read as a request of this message's type;
    /// `None` when they do not decode, or for ClusterStatus (it names none).
    pub(crate) fn client_in(&self, bytes: &[u8]) -> Option<String> {
        use prost::Message as _;
        match self {
            Message::NewShard(_) => NewShardRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::Put(_) => PutRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::BatchPut(_) => BatchPutRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::Delete(_) => DeleteRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::Get(_) => GetRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::BatchGet(_) => BatchGetRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::Scan(_) => ScanRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::ScanIndex(_) => ScanIndexRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::Stats(_) | Message::CloseShard(_) | Message::DeleteShard(_) => {
                ShardRef::decode(bytes).ok().map(|r| r.client_id)
            }
            Message::ListShards(_) => ListShardsRequest::decode(bytes).ok().map(|r| r.client_id),
            Message::ClusterStatus(_) => None,
        }
    }
}

/// The shards generated calls go to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shards {
    /// The owner's shard most calls go to.
    pub(crate) main: u64,
    /// The owner's shard close and delete calls go to (made anew once deleted).
    pub(crate) victim: u64,
}

impl Shards {
    /// Most picks are the main shard; some 0, a never-made id, the victim.
    fn shard_id(&self, pick: u8) -> u64 {
        match pick % 8 {
            0 => 0,
            1 => u64::MAX - u64::from(pick),
            2 => self.victim,
            _ => self.main,
        }
    }

    /// The request of `call`, and whether it names another client on the
    /// owner's shards.
    pub(crate) fn message(&self, call: Call) -> (Message, bool) {
        let foreign = |client: &str| client != OWNER;
        match call {
            Call::NewShard { client, size_limit } => {
                (Message::NewShard(NewShardRequest { client_id: client, size_limit_bytes: size_limit }), false)
            }
            Call::Put { shard, client, key, value, indexes, request_id } => {
                let other = foreign(&client);
                let shard_id = self.shard_id(shard);
                (Message::Put(PutRequest { shard_id, client_id: client, key, value, indexes, request_id }), other)
            }
            Call::BatchPut { shard, client, entries, request_id } => {
                let other = foreign(&client);
                let entries = entries.into_iter().map(|(key, value)| Entry { key, value, indexes: vec![] }).collect();
                let req = BatchPutRequest { shard_id: self.shard_id(shard), client_id: client, entries, request_id };
                (Message::BatchPut(req), other)
            }
            Call::Delete { shard, client, key, request_id } => {
                let other = foreign(&client);
                let req = DeleteRequest { shard_id: self.shard_id(shard), client_id: client, key, request_id };
                (Message::Delete(req), other)
            }
            Call::Get { shard, client, key, stale } => {
                let other = foreign(&client);
                let req = GetRequest {
                    shard_id: self.shard_id(shard),
                    client_id: client,
                    key,
                    max_staleness_ms: stale,
                    ..Default::default()
                };
                (Message::Get(req), other)
            }
            Call::BatchGet { shard, client, keys, stale } => {
                let other = foreign(&client);
                let req = BatchGetRequest {
                    shard_id: self.shard_id(shard),
                    client_id: client,
                    keys,
                    max_staleness_ms: stale,
                    ..Default::default()
                };
                (Message::BatchGet(req), other)
            }
            Call::Scan { shard, client, start, end, limit, stale } => {
                let other = foreign(&client);
                let req = ScanRequest {
                    shard_id: self.shard_id(shard),
                    client_id: client,
                    start,
                    end,
                    limit,
                    max_staleness_ms: stale,
                    ..Default::default()
                };
                (Message::Scan(req), other)
            }
            Call::ScanIndex { shard, client, name, prefix, limit } => {
                let other = foreign(&client);
                let req = ScanIndexRequest {
                    shard_id: self.shard_id(shard),
                    client_id: client,
                    name,
                    value_prefix: prefix,
                    limit,
                };
                (Message::ScanIndex(req), other)
            }
            Call::Stats { shard, client } => {
                let other = foreign(&client);
                (Message::Stats(ShardRef { shard_id: self.shard_id(shard), client_id: client }), other)
            }
            Call::ListShards { client } => (Message::ListShards(ListShardsRequest { client_id: client }), false),
            Call::ClusterStatus => (Message::ClusterStatus(ClusterStatusRequest {}), false),
            Call::CloseShard { client } => {
                let other = foreign(&client);
                (Message::CloseShard(ShardRef { shard_id: self.victim, client_id: client }), other)
            }
            Call::DeleteShard { client } => {
                let other = foreign(&client);
                (Message::DeleteShard(ShardRef { shard_id: self.victim, client_id: client }), other)
            }
        }
    }
}

struct Fuzz {
    c: AttacheClient<Channel>,
    shards: Shards,
}

impl Fuzz {
    /// Runs `call`; returns whether it succeeded, and whether it named
    /// another client on the owner's shards.
    async fn run(&mut self, call: Call) -> (Result<(), tonic::Status>, bool) {
        fn done<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
            r.map(|_| ())
        }
        let (message, foreign) = self.shards.message(call);
        let c = &mut self.c;
        let result = match message {
            Message::NewShard(r) => done(c.new_shard(r).await),
            Message::Put(r) => done(c.put(r).await),
            Message::BatchPut(r) => done(c.batch_put(r).await),
            Message::Delete(r) => done(c.delete(r).await),
            Message::Get(r) => done(c.get(r).await),
            Message::BatchGet(r) => drain(c.batch_get(r).await).await,
            Message::Scan(r) => drain(c.scan(r).await).await,
            Message::ScanIndex(r) => drain(c.scan_index(r).await).await,
            Message::Stats(r) => done(c.shard_stats(r).await),
            Message::ListShards(r) => done(c.list_shards(r).await),
            Message::ClusterStatus(r) => done(c.cluster_status(r).await),
            Message::CloseShard(r) => done(c.close_shard(r).await),
            Message::DeleteShard(r) => {
                let r = done(c.delete_shard(r).await);
                if r.is_ok() {
                    self.shards.victim = new_shard(c).await;
                }
                r
            }
        };
        (result, foreign)
    }
}

/// A stream call's result: its first status, or OK once the stream ends.
async fn drain<T>(r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> Result<(), tonic::Status> {
    let mut stream = r?.into_inner();
    while let Some(item) = stream.next().await {
        item?;
    }
    Ok(())
}

async fn new_shard(c: &mut AttacheClient<Channel>) -> u64 {
    c.new_shard(NewShardRequest { client_id: OWNER.into(), size_limit_bytes: 0 }).await.unwrap().into_inner().shard_id
}

#[tokio::test]
async fn generated_requests_of_every_type_get_an_answer_a_person_can_act_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::start_dev(dir.path(), &[]);
    let mut c = p.client().await;
    let (main, victim) = (new_shard(&mut c).await, new_shard(&mut c).await);
    let mut fuzz = Fuzz { c, shards: Shards { main, victim } };
    let cases: usize = std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut runner = TestRunner::deterministic();
    let strategy = call();
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..cases {
        let call = strategy.new_tree(&mut runner).unwrap().current();
        let what = format!("case {i}: {:.300}", format!("{call:?}"));
        let (result, foreign) = tokio::time::timeout(std::time::Duration::from_secs(10), fuzz.run(call))
            .await
            .unwrap_or_else(|_| panic!("no answer in 10 s to {what}"));
        match &result {
            Ok(()) => assert!(!foreign, "a call naming another client succeeded: {what}"),
            Err(status) => {
                assert!(
                    !matches!(status.code(), Code::Internal | Code::Unknown),
                    "{:?} ({}) for {what}",
                    status.code(),
                    status.message()
                );
                assert!(!status.message().is_empty(), "{:?} without a message for {what}", status.code());
            }
        }
        let code = match &result {
            Ok(()) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *by_code.entry(code).or_default() += 1;
    }
    eprintln!("answers by code over {cases} generated calls: {by_code:?}");
    assert!(by_code.get("OK").copied().unwrap_or(0) > cases / 10, "too few calls succeeded to reach deep: {by_code:?}");
    // The node still serves the owner: a write and its read on a new shard.
    let shard = new_shard(&mut fuzz.c).await;
    let put = PutRequest {
        shard_id: shard,
        client_id: OWNER.into(),
        key: b"after".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    fuzz.c.put(put).await.unwrap();
    let got = fuzz
        .c
        .get(GetRequest { shard_id: shard, client_id: OWNER.into(), key: b"after".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found && got.value == b"v");
}

/// Passes request bytes through untouched and hands back response bytes:
/// a gRPC codec for sending what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// One method of a gRPC service: its path, whether it streams its
/// answer, and a valid request of it (encoded), to mutate.
pub(crate) struct Method {
    /// The method's path, `/package.Service/Method`.
    pub(crate) path: &'static str,
    /// Whether it answers with a stream.
    pub(crate) streaming: bool,
    /// A valid request, encoded.
    pub(crate) valid: Vec<u8>,
}

fn encoded(m: impl prost::Message) -> Vec<u8> {
    m.encode_to_vec()
}

/// Every method of `attache.v1.Attache`, with a valid request on `shard`.
pub(crate) fn node_methods(shard: u64) -> Vec<Method> {
    let id = || OWNER.to_string();
    let m = |path, streaming, valid| Method { path, streaming, valid };
    let shard_ref = ShardRef { shard_id: shard, client_id: id() };
    vec![
        m("/attache.v1.Attache/NewShard", false, encoded(NewShardRequest { client_id: id(), size_limit_bytes: 0 })),
        m(
            "/attache.v1.Attache/Put",
            false,
            encoded(PutRequest { shard_id: shard, client_id: id(), key: b"k".to_vec(), ..Default::default() }),
        ),
        m(
            "/attache.v1.Attache/BatchPut",
            false,
            encoded(BatchPutRequest {
                shard_id: shard,
                client_id: id(),
                entries: vec![Entry { key: b"k".to_vec(), value: b"v".to_vec(), indexes: vec![] }],
                request_id: String::new(),
            }),
        ),
        m(
            "/attache.v1.Attache/Delete",
            false,
            encoded(DeleteRequest { shard_id: shard, client_id: id(), key: b"k".to_vec(), request_id: String::new() }),
        ),
        m(
            "/attache.v1.Attache/Get",
            false,
            encoded(GetRequest { shard_id: shard, client_id: id(), key: b"k".to_vec(), ..Default::default() }),
        ),
        m(
            "/attache.v1.Attache/BatchGet",
            true,
            encoded(BatchGetRequest {
                shard_id: shard,
                client_id: id(),
                keys: vec![b"k".to_vec()],
                ..Default::default()
            }),
        ),
        m(
            "/attache.v1.Attache/Scan",
            true,
            encoded(ScanRequest { shard_id: shard, client_id: id(), ..Default::default() }),
        ),
        m(
            "/attache.v1.Attache/ScanIndex",
            true,
            encoded(ScanIndexRequest { shard_id: shard, client_id: id(), name: "i".into(), ..Default::default() }),
        ),
        m("/attache.v1.Attache/ShardStats", false, encoded(shard_ref.clone())),
        m("/attache.v1.Attache/ListShards", false, encoded(ListShardsRequest { client_id: id() })),
        m("/attache.v1.Attache/ClusterStatus", false, encoded(ClusterStatusRequest {})),
        // Last, as they close and delete the shard the others go to.
        m("/attache.v1.Attache/CloseShard", false, encoded(shard_ref.clone())),
        m("/attache.v1.Attache/DeleteShard", false, encoded(shard_ref)),
    ]
}

/// Every method of `attache.meta.v1.Metadata`, with a valid request.
pub(crate) fn metadata_methods() -> Vec<Method> {
    use attache_actors::meta::remote::proto as meta;
    let key = || meta::KeyRequest { key: b"fuzz/k".to_vec() };
    let m = |path, streaming, valid| Method { path, streaming, valid };
    vec![
        m("/attache.meta.v1.Metadata/Get", false, encoded(key())),
        m("/attache.meta.v1.Metadata/Range", false, encoded(key())),
        m(
            "/attache.meta.v1.Metadata/Put",
            false,
            encoded(meta::PutRequest { key: b"fuzz/k".to_vec(), value: b"v".to_vec(), lease: 0 }),
        ),
        m("/attache.meta.v1.Metadata/Delete", false, encoded(key())),
        m("/attache.meta.v1.Metadata/Txn", false, encoded(meta::TxnRequest::default())),
        m("/attache.meta.v1.Metadata/LeaseGrant", false, encoded(meta::LeaseGrantRequest { ttl_ms: 1_000 })),
        m("/attache.meta.v1.Metadata/LeaseKeepAlive", false, encoded(meta::LeaseResponse { lease: 1 })),
        m("/attache.meta.v1.Metadata/LeaseRevoke", false, encoded(meta::LeaseResponse { lease: 1 })),
        m(
            "/attache.meta.v1.Metadata/Watch",
            true,
            encoded(meta::WatchRequest { prefix: b"fuzz/".to_vec(), from_revision: 0 }),
        ),
    ]
}

/// Bytes of a request: arbitrary, or a valid request with bytes flipped,
/// cut off, or appended.
pub(crate) fn raw_request(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let flips = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4);
    let v = valid.clone();
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..96),
        2 => flips.prop_map(move |flips| {
            let mut b = v.clone();
            for (at, x) in flips {
                if !b.is_empty() {
                    let i = at.index(b.len());
                    b[i] ^= x | 1;
                }
            }
            b
        }),
        1 => any::<prop::sample::Index>().prop_map({
            let v = valid.clone();
            move |at| v[..at.index(v.len() + 1)].to_vec()
        }),
        1 => proptest::collection::vec(any::<u8>(), 1..24).prop_map(move |tail| [valid.clone(), tail].concat()),
    ]
}

/// Sends `bytes` to `path` as its request; the call's status (OK once a
/// stream ends).
async fn send_raw(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    streaming: bool,
    bytes: Vec<u8>,
) -> Result<(), tonic::Status> {
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    if streaming {
        // A stream that stays open (a watch) has answered: it is drained
        // for up to 200 ms.
        let answer = grpc.server_streaming(tonic::Request::new(bytes), path, Raw).await;
        tokio::time::timeout(std::time::Duration::from_millis(200), drain(answer)).await.unwrap_or(Ok(()))
    } else {
        grpc.unary(tonic::Request::new(bytes), path, Raw).await.map(drop)
    }
}

/// At most 600 characters of `s`, for a failure message.
pub(crate) fn brief(s: String) -> String {
    match s.char_indices().nth(600) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s,
    }
}

/// The code of a raw call's answer (`what` describes the call), checked: a status that is not
/// UNKNOWN, with a message, and INTERNAL only for a request that does not
/// parse: a message that fails to decode, a gRPC frame that breaks the
/// protocol (tonic's "protocol error: ..."), or no message at all, which
/// is the code gRPC gives each. Panics,
/// naming `what`, otherwise.
pub(crate) fn checked_answer(result: &Result<(), tonic::Status>, what: impl Fn() -> String) -> Code {
    match result {
        Ok(()) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "{:?} without a message for {}", s.code(), what());
            assert_ne!(s.code(), Code::Unknown, "{}: {}", what(), s.message());
            if s.code() == Code::Internal {
                let m = s.message();
                // tonic's and prost's words, not the service's.
                let request_did_not_parse = m.starts_with("failed to decode Protobuf message")
                    || m == "Unexpected EOF decoding stream."
                    || m.starts_with("protocol error: ")
                    || m == "Missing request message.";
                assert!(request_did_not_parse, "INTERNAL that is no decode or framing error for {}: {s:?}", what());
            }
            s.code()
        }
    }
}

/// Sends `cases` generated byte strings to each of `methods` at `addr`.
/// Every call must answer within 10 s with a status that is not UNKNOWN,
/// and INTERNAL only for a request that is not protobuf (the code gRPC
/// gives a request that fails to parse), with a message. Returns the
/// answers by code.
async fn raw_calls(addr: &str, methods: &[Method], cases: usize) -> std::collections::BTreeMap<String, usize> {
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    let mut runner = TestRunner::deterministic();
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for m in methods {
        let strategy = raw_request(m.valid.clone());
        for i in 0..cases {
            let bytes = strategy.new_tree(&mut runner).unwrap().current();
            let what = format!("{} case {i}: {bytes:02x?}", m.path);
            let what = || what.clone();
            let result = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                send_raw(&mut grpc, m.path, m.streaming, bytes),
            )
            .await
            .unwrap_or_else(|_| panic!("no answer in 10 s to {}", what()));
            let code = checked_answer(&result, what);
            *by_code.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    by_code
}

/// Raw bytes as the request of every method of a node (`attache dev`,
/// RocksDB) and of `attache meta`: arbitrary bytes and valid requests
/// with bytes flipped, cut or appended. Properties as [`raw_calls`]; after
/// all of it both still serve. Cases per method: `ATTACHE_FUZZ_CASES`
/// (default 100).
#[tokio::test]
async fn raw_bytes_to_every_method_get_an_answer_and_the_servers_keep_serving() {
    let cases: usize = std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let p = common::start_dev(&dir.path().join("dev"), &[]);
    let mut c = p.client().await;
    let shard = new_shard(&mut c).await;
    let node = raw_calls(&p.addr, &node_methods(shard), cases).await;
    eprintln!("node: answers by code over {} raw calls: {node:?}", cases * 13);
    assert!(node.contains_key("Internal") && node.contains_key("Ok"), "the inputs reach both ends: {node:?}");
    let shard = new_shard(&mut c).await;
    let put = PutRequest { shard_id: shard, client_id: OWNER.into(), key: b"after".to_vec(), ..Default::default() };
    c.put(put).await.expect("the node still takes writes");

    let meta = common::start_meta(&dir.path().join("meta"));
    let at_meta = raw_calls(&meta.addr, &metadata_methods(), cases).await;
    eprintln!("attache meta: answers by code over {} raw calls: {at_meta:?}", cases * 9);
    use attache_actors::meta::MetadataBackend as _;
    let backend = attache_actors::meta::remote::RemoteBackend::new(meta.addr.clone());
    backend.put(b"after", b"v", 0).await.expect("attache meta still takes writes");
}
