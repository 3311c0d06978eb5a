//! One `attache meta` and two `attache node` processes: both nodes create
//! shards; ids are unique and increasing across them; each node finds every
//! shard through the shared metadata store, and sends clients to the node
//! that serves it.

use crate::common;

use attache_actors::service::primary_hint;
use attache_actors::service::proto::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_metadata_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let meta = common::start_meta(&root.join("meta"));
    let metadata = format!("grpc://{}", meta.addr);
    let node = |name: &str, vols: &str| common::start_node(root, name, vols, &metadata, &[]);
    let a = node("node-a", "vol-a1,vol-a2");
    let b = node("node-b", "vol-b1");
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // Shards from both nodes, interleaved: ids unique and increasing.
    let mut created = Vec::new();
    for i in 0..6 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let info =
            c.new_shard(NewShardRequest { client_id: "app".into(), size_limit_bytes: 0 }).await.unwrap().into_inner();
        created.push(info);
    }
    let ids: Vec<u64> = created.iter().map(|s| s.shard_id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase across nodes: {ids:?}");
    assert!(created.iter().step_by(2).all(|s| s.volume_id.starts_with("vol-a")));
    assert!(created.iter().skip(1).step_by(2).all(|s| s.volume_id == "vol-b1"));

    // Both nodes see every shard through the metadata store.
    for c in [&mut ca, &mut cb] {
        let list = c.list_shards(ListShardsRequest { client_id: "app".into() }).await.unwrap().into_inner();
        assert_eq!(list.shards.iter().map(|s| s.shard_id).collect::<Vec<_>>(), ids);
        let status = c.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.nodes.len(), 2);
        assert_eq!(status.volumes.len(), 3);
    }

    // A node serves its own shards and points clients at the other node for the rest.
    let on_a = created[0].shard_id;
    let put = |shard_id| PutRequest {
        shard_id,
        client_id: "app".into(),
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        indexes: vec![],
        request_id: String::new(),
    };
    ca.put(put(on_a)).await.unwrap();
    let err = cb.put(put(on_a)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(primary_hint(&err).as_deref(), Some(a.addr.as_str()), "the hint names node a");
    let get =
        GetRequest { shard_id: on_a, client_id: "app".into(), key: b"k".to_vec(), consistency: 0, max_staleness_ms: 0 };
    assert_eq!(ca.get(get).await.unwrap().into_inner().value, b"v");
}
