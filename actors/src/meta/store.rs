//! [`MetaOps`]: Attaché's domain operations (ids, shard records, volume
//! owner records, node liveness) on any [`MetadataBackend`]: the embedded
//! store's actor (`crate::meta::embedded`), the same over gRPC, or etcd.
//!
//! Layout (values are JSON so `etcdctl get` shows them readably):
//! - `/attache/ids/shard`, `/attache/ids/node` -> [`IdCounter`]: the last id
//!   allocated and the token of the allocation that took it;
//! - `/attache/shards/{id:020}` -> [`ShardRecord`] (shard -> volume, owner, state);
//! - `/attache/volumes/{volume_id}` -> [`VolumeRecord`], the owner record:
//!   the primary node and its epoch (the fencing token);
//! - `/attache/nodes/{id:020}` -> [`NodeRecord`], attached to the node's lease,
//!   so it vanishes when the node stops renewing it.
//!
//! Ids are allocated by compare-and-swap on the counter's mod revision; a
//! volume is claimed by compare-and-swap on the owner record's mod revision,
//! bumping the epoch. A CAS whose outcome is unknown (timeout) is not
//! repeated blindly: the counter carries a random token per attempt, and the
//! owner record names the claimant, so a re-read tells whether it landed.
//! Reads and idempotent writes go through [`retry`].

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::meta::backend::{
    Compare, CompareOp, KeyValue, LeaseId, MetaError, MetadataBackend, Revision, Txn, TxnOp, WatchEvent, WatchStream,
};
use crate::retry::{retry, Jitter, RetryPolicy, Transient};
use crate::shard::layout::ShardState;
use crate::shard::ShardId;

/// A node id, allocated by the metadata store and kept in the node's data dir.
pub type NodeId = u64;

/// Key prefix of every Attaché key.
pub const ROOT: &str = "/attache/";
/// Most CAS rounds an allocation tries under contention before giving up.
const MAX_CAS_ROUNDS: u32 = 1000;

/// The value of an id counter key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdCounter {
    /// The last id allocated.
    pub last: u64,
    /// Random token of the allocation that took `last`.
    pub token: u64,
}

/// Where a shard lives and who owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The shard.
    pub shard_id: ShardId,
    /// The client that owns the shard.
    pub client_id: String,
    /// The volume holding the shard's data.
    pub volume_id: String,
    /// The shard's lifecycle state.
    pub state: ShardState,
    /// Bytes.
    pub size_limit: u64,
}

/// The owner record of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume.
    pub volume_id: String,
    /// The node that holds the volume read-write; 0 when vacant (its primary
    /// stepped down and nobody claimed it yet).
    pub primary: NodeId,
    /// The fencing token: bumped by every takeover, never reused.
    pub epoch: u64,
}

/// A live node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub node_id: NodeId,
    /// gRPC address clients reach the node at, `host:port`.
    pub address: String,
    /// Cloud instance id (EC2), empty when none.
    pub instance_id: String,
    /// The volumes the node has attached (as primary or backup).
    pub volumes: Vec<String>,
}

/// Most compare-and-swap rounds `MetaOps::set_shard_state` runs before it
/// gives up (each lost round means another change landed).
pub const STATE_CAS_ROUNDS: usize = 16;

/// A shard state's place in the only order states move in.
fn state_rank(state: ShardState) -> u8 {
    match state {
        ShardState::Active => 0,
        ShardState::ReadOnly => 1,
        ShardState::Deleted => 2,
    }
}

/// Key of a shard's record.
pub fn shard_key(id: ShardId) -> String {
    format!("{ROOT}shards/{id:020}")
}

/// Key of a volume's owner record.
pub fn volume_key(volume_id: &str) -> String {
    format!("{ROOT}volumes/{volume_id}")
}

/// Key of a node's liveness record.
pub fn node_key(id: NodeId) -> String {
    format!("{ROOT}nodes/{id:020}")
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain records serialize")
}

fn from_json<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, MetaError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| MetaError::Storage(format!("malformed record at {}: {e}", String::from_utf8_lossy(&kv.key))))
}

/// The domain operations over any [`MetadataBackend`]; cheap to clone, and
/// they hold no state of their own, so any task may call them concurrently.
#[derive(Clone)]
pub struct MetaOps {
    backend: Arc<dyn MetadataBackend>,
    policy: RetryPolicy,
    jitter: Jitter,
    /// Simulation only: claims overwrite the owner record without comparing
    /// its revision, to show what the compare-and-swap prevents.
    blind_claims: bool,
}

impl MetaOps {
    /// A handle on the domain operations over `backend`.
    pub fn new(backend: Arc<dyn MetadataBackend>, policy: RetryPolicy, seed: u64) -> Self {
        MetaOps { backend, policy, jitter: Jitter::new(seed), blind_claims: false }
    }

    /// The backoff jitter, seeded as given to [`MetaOps::new`] (per node), for
    /// other retries of the same caller.
    pub fn jitter(&self) -> &Jitter {
        &self.jitter
    }

    /// Simulation only: turns the claim's compare-and-swap off (the first
    /// fencing layer), so a test can show a checker catches its absence.
    pub fn with_blind_claims(mut self) -> Self {
        self.blind_claims = true;
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn MetadataBackend> {
        &self.backend
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        retry(&self.policy, &self.jitter, "get", || self.backend.get(key.as_bytes())).await
    }

    async fn range<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, MetaError> {
        let resp = retry(&self.policy, &self.jitter, "range", || self.backend.range(prefix.as_bytes())).await?;
        resp.kvs.iter().map(from_json).collect()
    }

    /// Allocates the next id of counter `name`: unique and greater than every
    /// id allocated before, across nodes and restarts of the store.
    ///
    /// Errors: transient errors past the retry policy; `Unavailable` after
    /// 1000 lost races in a row.
    pub async fn allocate_id(&self, name: &str) -> Result<u64, MetaError> {
        let key = format!("{ROOT}ids/{name}");
        for _ in 0..MAX_CAS_ROUNDS {
            let current = self.get(&key).await?;
            let (last, rev) = match &current {
                Some(kv) => (from_json::<IdCounter>(kv)?.last, kv.mod_revision),
                None => (0, 0),
            };
            let token = self.jitter.token();
            let next = IdCounter { last: last + 1, token };
            let txn = Txn {
                compare: vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)],
                success: vec![TxnOp::Put { key: key.clone().into_bytes(), value: to_json(&next), lease: 0 }],
                failure: vec![],
            };
            match self.backend.txn(txn).await {
                Ok(resp) if resp.succeeded => return Ok(next.last),
                Ok(_) => continue,
                Err(e) if e.is_transient() => {
                    // The CAS may have landed: only the token tells.
                    if let Some(kv) = self.get(&key).await? {
                        if from_json::<IdCounter>(&kv)? == next {
                            return Ok(next.last);
                        }
                    }
                    tokio::time::sleep(self.jitter.below(self.policy.cap(1))).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(MetaError::Unavailable(format!("could not allocate a {name} id: {MAX_CAS_ROUNDS} lost races")))
    }

    /// Creates a shard's record. Errors: `Invalid` when the id is taken.
    pub async fn register_shard(&self, record: &ShardRecord) -> Result<(), MetaError> {
        let key = shard_key(record.shard_id);
        let txn = Txn {
            compare: vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
            success: vec![TxnOp::Put { key: key.clone().into_bytes(), value: to_json(record), lease: 0 }],
            failure: vec![TxnOp::Get { key: key.into_bytes() }],
        };
        // Safe to repeat: a repeat that finds our own record has succeeded.
        let resp = retry(&self.policy, &self.jitter, "register shard", || self.backend.txn(txn.clone())).await?;
        let ours = |kv: &Option<KeyValue>| kv.as_ref().map(from_json::<ShardRecord>).transpose();
        if resp.succeeded || ours(&resp.gets[0])?.as_ref() == Some(record) {
            return Ok(());
        }
        Err(MetaError::Invalid(format!("shard id {} is registered already", record.shard_id)))
    }

    /// A shard's record.
    pub async fn shard(&self, id: ShardId) -> Result<Option<ShardRecord>, MetaError> {
        self.get(&shard_key(id)).await?.as_ref().map(from_json).transpose()
    }

    /// Moves a shard record's state forward (active, then read-only, then
    /// deleted), never back: a compare-and-swap on the record's revision,
    /// read again and repeated when another change got there first, so a
    /// close racing a delete cannot leave a deleted shard read-only. A state
    /// at or before the record's changes nothing (idempotent).
    ///
    /// Errors: `Invalid` when the shard has no record; the backend's after
    /// its retries; `Unavailable` after [`STATE_CAS_ROUNDS`] lost races.
    pub async fn set_shard_state(&self, id: ShardId, state: ShardState) -> Result<(), MetaError> {
        let key = shard_key(id);
        for _ in 0..STATE_CAS_ROUNDS {
            let Some(kv) = self.get(&key).await? else {
                return Err(MetaError::Invalid(format!("shard {id} has no record")));
            };
            let mut record: ShardRecord = from_json(&kv)?;
            if state_rank(record.state) >= state_rank(state) {
                return Ok(());
            }
            record.state = state;
            let txn = Txn {
                compare: vec![Compare::mod_revision(key.clone().into_bytes(), CompareOp::Equal, kv.mod_revision)],
                success: vec![TxnOp::Put { key: key.clone().into_bytes(), value: to_json(&record), lease: 0 }],
                failure: vec![],
            };
            // A repeat after an unknown outcome is safe: if the first landed,
            // the compare fails and the next round reads the state it set.
            if retry(&self.policy, &self.jitter, "set shard state", || self.backend.txn(txn.clone())).await?.succeeded {
                return Ok(());
            }
        }
        Err(MetaError::Unavailable(format!("shard {id}: its state kept changing under {STATE_CAS_ROUNDS} tries")))
    }

    /// Every shard record, by id; only `client_id`'s when given.
    pub async fn shards(&self, client_id: Option<&str>) -> Result<Vec<ShardRecord>, MetaError> {
        let all: Vec<ShardRecord> = self.range(&format!("{ROOT}shards/")).await?;
        Ok(all.into_iter().filter(|r| client_id.is_none_or(|c| r.client_id == c)).collect())
    }

    /// A volume's owner record with its mod revision (for a CAS).
    pub async fn volume(&self, volume_id: &str) -> Result<Option<(VolumeRecord, Revision)>, MetaError> {
        match self.get(&volume_key(volume_id)).await? {
            Some(kv) => Ok(Some((from_json(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every volume's owner record.
    pub async fn volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        self.range(&format!("{ROOT}volumes/")).await
    }

    /// Makes `node` the primary of `volume_id` if the owner record is still at
    /// `expected` (its mod revision; 0: no record yet), with the epoch one above
    /// the record's (1 for a new record). A takeover (the record names
    /// another node) also requires that node's liveness record to be absent
    /// in the same transaction: a primary that registered again since the
    /// caller looked is not gone. Returns `Ok(Ok(record))` when won,
    /// `Ok(Err(current))` when another claim got there first or the old
    /// primary is back.
    pub async fn claim_volume(
        &self,
        volume_id: &str,
        node: NodeId,
        expected: Option<&(VolumeRecord, Revision)>,
    ) -> Result<Result<VolumeRecord, Option<(VolumeRecord, Revision)>>, MetaError> {
        let key = volume_key(volume_id);
        let (epoch, rev) = expected.map_or((0, 0), |(r, rev)| (r.epoch, *rev));
        let claim = VolumeRecord { volume_id: volume_id.to_string(), primary: node, epoch: epoch + 1 };
        let old_primary = expected.map(|(r, _)| r.primary).filter(|&p| p != 0 && p != node);
        let compare = if self.blind_claims {
            Vec::new()
        } else {
            let mut c = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)];
            // Absent: no create revision (as create-if-absent compares).
            c.extend(old_primary.map(|p| Compare::create_revision(node_key(p), CompareOp::Equal, 0)));
            c
        };
        let txn = Txn {
            compare,
            success: vec![TxnOp::Put { key: key.clone().into_bytes(), value: to_json(&claim), lease: 0 }],
            failure: vec![],
        };
        match self.backend.txn(txn).await {
            Ok(resp) if resp.succeeded => Ok(Ok(claim)),
            Ok(_) => Ok(Err(self.volume(volume_id).await?)),
            Err(e) if e.is_transient() => {
                // Unknown outcome: the record names its claimant and epoch.
                let current = self.volume(volume_id).await?;
                match current {
                    Some((record, _)) if record == claim => Ok(Ok(claim)),
                    other => Ok(Err(other)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Marks `volume_id` as having no primary, if `node` still holds it at
    /// `epoch` (the epoch stays, so the next claim bumps it). Returns whether
    /// the record was vacated.
    pub async fn vacate_volume(&self, volume_id: &str, node: NodeId, epoch: u64) -> Result<bool, MetaError> {
        let Some((record, rev)) = self.volume(volume_id).await? else { return Ok(false) };
        if record.primary != node || record.epoch != epoch {
            return Ok(false);
        }
        let key = volume_key(volume_id);
        let vacant = VolumeRecord { volume_id: volume_id.to_string(), primary: 0, epoch };
        let txn = Txn {
            compare: vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)],
            success: vec![TxnOp::Put { key: key.into_bytes(), value: to_json(&vacant), lease: 0 }],
            failure: vec![],
        };
        Ok(self.backend.txn(txn).await?.succeeded)
    }

    /// A node's liveness record; `None` once its lease expired.
    pub async fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, MetaError> {
        self.get(&node_key(id)).await?.as_ref().map(from_json).transpose()
    }

    /// Grants a node lease of `ttl_ms` milliseconds.
    pub async fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        self.backend.lease_grant(ttl_ms).await
    }

    /// Renews a lease; returns its TTL in ms. Errors: `LeaseNotFound` once expired.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        self.backend.lease_keep_alive(lease).await
    }

    /// Publishes a node's liveness record under its lease.
    pub async fn register_node(&self, record: &NodeRecord, lease: LeaseId) -> Result<(), MetaError> {
        let value = to_json(record);
        let key = node_key(record.node_id);
        retry(&self.policy, &self.jitter, "register node", || self.backend.put(key.as_bytes(), &value, lease)).await?;
        Ok(())
    }

    /// The nodes whose lease is live, by id.
    pub async fn live_nodes(&self) -> Result<Vec<NodeRecord>, MetaError> {
        self.range(&format!("{ROOT}nodes/")).await
    }

    /// From now on, the changes that call for a volume manager's check at
    /// once: a liveness record deleted (a node's lease expired or was
    /// revoked) and any change of `volume_id`'s owner record. A wake-up
    /// call only: the caller reads the records itself, and keeps polling
    /// (changes made while a watch is being set up are missed, and a
    /// partition can stall a stream without ending it).
    ///
    /// Errors: the backend's, when either watch cannot be set up.
    pub async fn watch_takeover_events(&self, volume_id: &str) -> Result<WatchStream, MetaError> {
        use futures::StreamExt as _;
        let nodes = self.backend.watch(format!("{ROOT}nodes/").as_bytes(), 0).await?;
        let key = volume_key(volume_id);
        let volume = self.backend.watch(key.as_bytes(), 0).await?;
        let deletes = nodes.filter(|e| std::future::ready(!matches!(e, Ok(WatchEvent::Put(_)))));
        // A watch is of a prefix: `vol-1`'s also sees `vol-10`.
        let this_volume =
            volume.filter(move |e| std::future::ready(e.as_ref().map_or(true, |e| e.key() == key.as_bytes())));
        Ok(Box::pin(futures::stream::select(deletes, this_volume)))
    }
}
