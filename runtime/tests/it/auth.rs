//! Authenticated identities with real processes. Tokens made by `attache
//! token`: `attache dev --token-file` serves a client only as itself
//! (every operation type tried as another client is `PERMISSION_DENIED`
//! and changes nothing; without a token, or with an unknown one,
//! `UNAUTHENTICATED`), and `ClusterStatus` only to an operator; `attache
//! meta --token-file` serves only node identities, so a node starts with
//! its token and is refused without one, and a client's token changes no
//! metadata. The same rules by certificate subject are in `tls`.

use crate::common;

use std::path::Path;
use std::process::Command;

use attache_actors::auth::BearerToken;
use attache_actors::client::{CallSpec, Client, ClientSettings, Failure};
use attache_actors::meta::remote::RemoteBackend;
use attache_actors::meta::{MetaError, MetadataBackend};
use attache_actors::service::proto::{
    BatchGetRequest, BatchPutRequest, ClusterStatusRequest, DeleteRequest, Entry, GetRequest, ListShardsRequest,
    NewShardRequest, PutRequest, ScanIndexRequest, ScanRequest, ShardRef, ShardState,
};
use tonic::Code;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Makes a token for `name` in `groups` with `attache token`, appends its
/// line to `dir/tokens`, and returns the token.
pub fn make_token(dir: &Path, name: &str, groups: &[&str]) -> String {
    let out_file = dir.join(format!("{name}.token"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attache"));
    cmd.args(["token", name, "--out", s(&out_file)]);
    for g in groups {
        cmd.args(["--group", g]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "attache token: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let token = std::fs::read_to_string(&out_file).unwrap().trim().to_string();
    assert!(!line.contains(&token), "the token file line holds the token itself");
    let tokens = dir.join("tokens");
    let before = std::fs::read_to_string(&tokens).unwrap_or_default();
    std::fs::write(&tokens, before + &line).unwrap();
    token
}

fn client(addr: &str, token: Option<&str>) -> Client {
    let c =
        Client::new(&[addr.to_string()], ClientSettings { deadline_ms: 5_000, ..ClientSettings::default() }).unwrap();
    match token {
        Some(t) => c.with_token(BearerToken::new(t).unwrap()),
        None => c,
    }
}

/// The code a call ended with (`Ok` when served).
fn code<T>(r: Result<attache_actors::client::Served<T>, Failure>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(f) => f.status.code(),
    }
}

/// Sends `req` through `c` with `method`, once, and gives its code.
macro_rules! try_call {
    ($c:expr, $method:ident, $req:expr) => {{
        let req = $req;
        code(
            $c.call(CallSpec::any().once(), |mut c| {
                let r = req.clone();
                async move { c.$method(r).await }
            })
            .await,
        )
    }};
}

/// Every operation that names a client, on `shard` as client `who`, by
/// `c`: each with the code it ended with.
async fn every_operation(c: &Client, shard: u64, who: &str) -> Vec<(&'static str, Code)> {
    let id = who.to_string();
    let entry = Entry { key: "k".into(), value: "stolen".into(), indexes: vec![] };
    let shard_ref = ShardRef { shard_id: shard, client_id: id.clone() };
    vec![
        ("NewShard", try_call!(c, new_shard, NewShardRequest { client_id: id.clone(), size_limit_bytes: 0 })),
        (
            "Put",
            try_call!(
                c,
                put,
                PutRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    key: "k".into(),
                    value: "stolen".into(),
                    indexes: vec![],
                    request_id: String::new(),
                }
            ),
        ),
        (
            "BatchPut",
            try_call!(
                c,
                batch_put,
                BatchPutRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    entries: vec![entry],
                    request_id: String::new()
                }
            ),
        ),
        (
            "Delete",
            try_call!(
                c,
                delete,
                DeleteRequest { shard_id: shard, client_id: id.clone(), key: "k".into(), request_id: String::new() }
            ),
        ),
        (
            "Get",
            try_call!(
                c,
                get,
                GetRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    key: "k".into(),
                    consistency: 0,
                    max_staleness_ms: 0
                }
            ),
        ),
        (
            "BatchGet",
            try_call!(
                c,
                batch_get,
                BatchGetRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    keys: vec!["k".into()],
                    consistency: 0,
                    max_staleness_ms: 0
                }
            ),
        ),
        (
            "Scan",
            try_call!(
                c,
                scan,
                ScanRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    start: vec![],
                    end: vec![],
                    limit: 0,
                    consistency: 0,
                    max_staleness_ms: 0
                }
            ),
        ),
        (
            "ScanIndex",
            try_call!(
                c,
                scan_index,
                ScanIndexRequest {
                    shard_id: shard,
                    client_id: id.clone(),
                    name: "i".into(),
                    value_prefix: vec![],
                    limit: 0
                }
            ),
        ),
        ("ShardStats", try_call!(c, shard_stats, shard_ref.clone())),
        ("ListShards", try_call!(c, list_shards, ListShardsRequest { client_id: id.clone() })),
        ("CloseShard", try_call!(c, close_shard, shard_ref.clone())),
        ("DeleteShard", try_call!(c, delete_shard, shard_ref.clone())),
    ]
}

#[actix_rt::test]
async fn a_token_acts_only_as_its_own_client_and_operators_see_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let alice = make_token(root, "alice", &[]);
    let bob = make_token(root, "bob", &[]);
    let ops = make_token(root, "ops", &["attache:operator"]);
    let dev = common::start_dev(&root.join("data"), &["--token-file", s(&root.join("tokens"))]);

    // Alice's shard, with k = v.
    let a = client(&dev.addr, Some(&alice));
    let shard = a
        .call(CallSpec::any().once(), |mut c| async move {
            c.new_shard(NewShardRequest { client_id: "alice".into(), size_limit_bytes: 0 }).await
        })
        .await
        .expect("alice creates a shard as herself")
        .value
        .shard_id;
    let put = PutRequest {
        shard_id: shard,
        client_id: "alice".into(),
        key: "k".into(),
        value: "v".into(),
        indexes: vec![],
        request_id: a.request_id(),
    };
    assert_eq!(try_call!(a, put, put), Code::Ok);

    // Every operation as alice: by bob's token, PERMISSION_DENIED; with no
    // token or an unknown one, UNAUTHENTICATED. An operator acts as no
    // client either (it may only list).
    let b = client(&dev.addr, Some(&bob));
    for (op, got) in every_operation(&b, shard, "alice").await {
        assert_eq!(got, Code::PermissionDenied, "bob's {op} as alice");
    }
    for (who, c) in [("no token", client(&dev.addr, None)), ("an unknown token", client(&dev.addr, Some("guess")))] {
        for (op, got) in every_operation(&c, shard, "alice").await {
            assert_eq!(got, Code::Unauthenticated, "{op} as alice with {who}");
        }
    }
    let o = client(&dev.addr, Some(&ops));
    for (op, got) in every_operation(&o, shard, "alice").await {
        let want = if op == "ListShards" { Code::Ok } else { Code::PermissionDenied };
        assert_eq!(got, want, "the operator's {op} as alice");
    }

    // Nothing changed: alice's one shard is active with k = v.
    let got = a
        .call(CallSpec::shard(shard), |mut c| async move {
            c.get(GetRequest {
                shard_id: shard,
                client_id: "alice".into(),
                key: "k".into(),
                consistency: 0,
                max_staleness_ms: 0,
            })
            .await
        })
        .await
        .unwrap()
        .value;
    assert_eq!(got.value, b"v", "a refused write changed the shard");
    let listed = a
        .call(
            CallSpec::any(),
            |mut c| async move { c.list_shards(ListShardsRequest { client_id: "alice".into() }).await },
        )
        .await
        .unwrap()
        .value
        .shards;
    assert_eq!(listed.len(), 1, "a refused NewShard created a shard: {listed:?}");
    assert_eq!(listed[0].state, ShardState::Active as i32, "a refused close or delete took effect");

    // ClusterStatus: operators only.
    assert_eq!(try_call!(a, cluster_status, ClusterStatusRequest {}), Code::PermissionDenied);
    assert_eq!(try_call!(o, cluster_status, ClusterStatusRequest {}), Code::Ok);

    // attache client with --token-file: served as alice, refused as bob.
    let cli = |token: &str, client_id: &str| {
        Command::new(env!("CARGO_BIN_EXE_attache"))
            .args(["client", "--addr", &dev.addr, "--token-file", s(&root.join(token))])
            .args(["get", "--shard", &shard.to_string(), "--client-id", client_id, "k"])
            .output()
            .unwrap()
    };
    let out = cli("alice.token", "alice");
    assert!(out.status.success(), "attache client --token-file: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
    let out = cli("bob.token", "alice");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("PERMISSION_DENIED") && err.contains("\"bob\""), "{err}");
    drop(dev);
}

#[actix_rt::test]
async fn the_metadata_store_serves_only_node_identities() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    make_token(root, "node-1", &["attache:node"]);
    let alice = make_token(root, "alice", &[]);
    let meta_dir = root.join("meta");
    let meta = common::start(
        &["meta", "--listen", "127.0.0.1:0", "--data-dir", s(&meta_dir), "--token-file", s(&root.join("tokens"))],
        "serving gRPC on ",
    );
    let metadata = format!("grpc://{}", meta.addr);

    // A node with its token starts and serves.
    let node = common::start_node(
        root,
        "node-1",
        "vol-1",
        &metadata,
        &["--metadata-token-file", s(&root.join("node-1.token"))],
    );
    let c = client(&node.addr, None);
    c.call(CallSpec::any().once(), |mut c| async move {
        c.new_shard(NewShardRequest { client_id: "anyone".into(), size_limit_bytes: 0 }).await
    })
    .await
    .expect("a node whose metadata store knows it serves");

    // A client's token, and no token, change and read no metadata.
    for (who, backend) in [
        ("a client's token", RemoteBackend::new(meta.addr.clone()).with_token(BearerToken::new(&alice).unwrap())),
        ("no token", RemoteBackend::new(meta.addr.clone())),
    ] {
        let refused = [
            backend.put(b"nodes/9", b"forged", 0).await.map(|_| ()),
            backend.delete(b"nodes/1").await.map(|_| ()),
            backend.get(b"nodes/1").await.map(|_| ()),
            backend.lease_grant(1_000).await.map(|_| ()),
        ];
        for r in refused {
            assert!(matches!(r, Err(MetaError::Refused(_))), "{who}: {r:?}");
        }
    }

    // A node without its token does not start: the store refuses it.
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir", s(&root.join("node-2"))])
        .args(["--volume-root", s(&root.join("volumes")), "--volumes", "vol-1", "--metadata", &metadata])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused"), "a node without a token: {err}");
    drop((node, meta));
}
