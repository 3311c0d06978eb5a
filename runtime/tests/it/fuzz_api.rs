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
const OWNER: &str = "fuzz-owner";

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

/// One generated call; `shard` picks the shard id (see [`Fuzz::shard_id`]).
#[derive(Clone, Debug)]
enum Call {
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

fn call() -> impl Strategy<Value = Call> {
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

struct Fuzz {
    c: AttacheClient<Channel>,
    /// The owner's shard most calls go to, and one that close and delete
    /// calls go to (made anew once deleted).
    main: u64,
    victim: u64,
}

impl Fuzz {
    /// Most picks are the main shard; some 0, a never-made id, the victim.
    fn shard_id(&self, pick: u8) -> u64 {
        match pick % 8 {
            0 => 0,
            1 => u64::MAX - u64::from(pick),
            2 => self.victim,
            _ => self.main,
        }
    }

    /// Runs `call`; returns whether it succeeded, and whether it named
    /// another client on the owner's shards.
    async fn run(&mut self, call: Call) -> (Result<(), tonic::Status>, bool) {
        fn done<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
            r.map(|_| ())
        }
        let foreign = |client: &str| client != OWNER;
        match call {
            Call::NewShard { client, size_limit } => (
                done(self.c.new_shard(NewShardRequest { client_id: client, size_limit_bytes: size_limit }).await),
                false,
            ),
            Call::Put { shard, client, key, value, indexes, request_id } => {
                let other = foreign(&client);
                let shard_id = self.shard_id(shard);
                let req = PutRequest { shard_id, client_id: client, key, value, indexes, request_id };
                (done(self.c.put(req).await), other)
            }
            Call::BatchPut { shard, client, entries, request_id } => {
                let other = foreign(&client);
                let entries = entries.into_iter().map(|(key, value)| Entry { key, value, indexes: vec![] }).collect();
                let req = BatchPutRequest { shard_id: self.shard_id(shard), client_id: client, entries, request_id };
                (done(self.c.batch_put(req).await), other)
            }
            Call::Delete { shard, client, key, request_id } => {
                let other = foreign(&client);
                let req = DeleteRequest { shard_id: self.shard_id(shard), client_id: client, key, request_id };
                (done(self.c.delete(req).await), other)
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
                (done(self.c.get(req).await), other)
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
                (drain(self.c.batch_get(req).await).await, other)
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
                (drain(self.c.scan(req).await).await, other)
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
                (drain(self.c.scan_index(req).await).await, other)
            }
            Call::Stats { shard, client } => {
                let other = foreign(&client);
                (done(self.c.shard_stats(ShardRef { shard_id: self.shard_id(shard), client_id: client }).await), other)
            }
            Call::ListShards { client } => {
                (done(self.c.list_shards(ListShardsRequest { client_id: client }).await), false)
            }
            Call::ClusterStatus => (done(self.c.cluster_status(ClusterStatusRequest {}).await), false),
            Call::CloseShard { client } => {
                let other = foreign(&client);
                (done(self.c.close_shard(ShardRef { shard_id: self.victim, client_id: client }).await), other)
            }
            Call::DeleteShard { client } => {
                let other = foreign(&client);
                let r = done(self.c.delete_shard(ShardRef { shard_id: self.victim, client_id: client }).await);
                if r.is_ok() {
                    self.victim = new_shard(&mut self.c).await;
                }
                (r, other)
            }
        }
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
    let mut fuzz = Fuzz { c, main, victim };
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
