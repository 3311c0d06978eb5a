//! The history a simulated workload records: every operation's invocation and
//! completion, in simulated time, in the shape Jepsen uses (process, type
//! invoke/ok/fail/info, f, key, value, time in ns), so an independent checker
//! can verify it too (`--history-out`).
//!
//! A `fail` completion means the operation certainly had no effect (the
//! service rejected it); `info` means the outcome is unknown (a timeout or a
//! transport error after the request may have arrived). After an `info` a
//! process takes a new id, as in Jepsen, since its last operation may still
//! be in flight.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The type of a history event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum F {
    /// Put `value` at `key`.
    Write,
    /// Get `key`; the completion's `value` is what was read (`None`: absent).
    Read,
    /// Get `key` accepting stale data (from any node that has the volume).
    StaleRead,
    /// Create a shard; the completion's `shard` is its id.
    NewShard,
    /// Delete `key` (a write of "absent").
    Delete,
    /// Close the shard (read-only from then on).
    CloseShard,
    /// Delete the shard.
    DeleteShard,
    /// List the client's shards; the completion's `value` is
    /// `id:state,...` (`active`, `read-only`), by id.
    ListShards,
    /// Put `value` at every key of `key` (keys joined by `,`), atomically
    /// (one BatchPut).
    BatchWrite,
    /// Get every key of `key` (joined by `,`) in one linearizable BatchGet;
    /// the completion's `value` is what was read (see [`encode_reads`]).
    BatchRead,
    /// Scan the whole shard, linearizably, through the stream's pages; the
    /// completion's `value` is every key found with its value (see
    /// [`encode_reads`]); a key not listed was absent.
    Scan,
    /// Scan the whole shard accepting stale data, at a random node (backups
    /// serve it): each page is a separate read of that node's view with its
    /// own age. The completion's `value` lists every key found as
    /// `key=value@age` (see [`aged`]), `age` being the `max_staleness_ms` of
    /// the page that held it; its `staleness_ms` is the largest page age.
    StaleScan,
    /// Read the whole secondary index that every put writes its value to
    /// (`workload::INDEX`), linearizably, through the stream's pages; the
    /// completion's `value` lists each hit as `key=value` in the order
    /// returned (see [`encode_reads`]); a key not listed was absent.
    ScanIndex,
    /// ShardStats of the shard; the completion's `value` is
    /// `live_keys=N state=S` (`active`, `read-only`).
    ShardStats,
}

impl F {
    /// Whether it changes a key: a put or a delete.
    pub fn is_write(self) -> bool {
        matches!(self, F::Write | F::Delete | F::BatchWrite)
    }

    /// Whether it reads keys (linearizable or stale, one key or several).
    pub fn is_read(self) -> bool {
        matches!(self, F::Read | F::StaleRead | F::BatchRead | F::Scan | F::StaleScan | F::ScanIndex)
    }

    /// A short name for summaries, such as `write`.
    pub fn name(self) -> &'static str {
        match self {
            F::Write => "write",
            F::Read => "read",
            F::StaleRead => "stale_read",
            F::NewShard => "new_shard",
            F::Delete => "delete",
            F::CloseShard => "close_shard",
            F::DeleteShard => "delete_shard",
            F::ListShards => "list_shards",
            F::BatchWrite => "batch_write",
            F::BatchRead => "batch_read",
            F::Scan => "scan",
            F::StaleScan => "stale_scan",
            F::ScanIndex => "scan_index",
            F::ShardStats => "shard_stats",
        }
    }
}

/// The `value` of a multi-key read: `key=value` for each key found, a bare
/// `key` for one read as absent, space-separated, in the order given.
/// (Workload keys and values hold neither spaces nor `=`.)
pub fn encode_reads<'a>(reads: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let parts: Vec<String> = reads
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.to_string(),
        })
        .collect();
    parts.join(" ")
}

/// The reads of an [`encode_reads`] value, by key.
pub fn decode_reads(value: &str) -> BTreeMap<String, Option<String>> {
    value
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (p.to_string(), None),
        })
        .collect()
}

/// A value read by a stale scan with the age of the page that held it:
/// `value@age` (workload values hold no `@`); [`split_aged`] undoes it.
pub fn aged(value: &str, age_ms: u64) -> String {
    format!("{value}@{age_ms}")
}

/// The value and page age (ms) of an [`aged`] value; `None` when it has no
/// age or the age is not a number.
pub fn split_aged(value: &str) -> Option<(&str, u64)> {
    let (v, age) = value.rsplit_once('@')?;
    Some((v, age.parse().ok()?))
}

/// One event of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub f: F,
    /// The client id the operation used.
    pub client: String,
    pub shard: u64,
    pub key: String,
    pub value: Option<String>,
    /// Simulated ns since the run started.
    pub time: u64,
    /// The node address the request went to.
    pub node: String,
    /// Why it failed, for `fail` and `info`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// For an `ok` stale read: how stale the serving node said its view
    /// might be, ms (`max_staleness_ms` of the response). For the
    /// invocation of a stale read: the oldest view it asked for
    /// (`max_staleness_ms` of the request), if it asked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub staleness_ms: Option<u64>,
}

/// A completed (or never completed) operation: its invocation paired with its completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub process: u64,
    pub f: F,
    pub client: String,
    pub shard: u64,
    pub key: String,
    /// The written value (writes) or the value read (ok reads).
    pub value: Option<String>,
    pub invoke: u64,
    /// Completion time; `None` for `info` (may take effect any time after invoke).
    pub complete: Option<u64>,
    pub outcome: EventType,
    pub node: String,
    /// See `Event::staleness_ms`: the reported age.
    pub staleness_ms: Option<u64>,
    /// The oldest view a stale read asked for, ms (see `Event::staleness_ms`).
    pub requested_staleness_ms: Option<u64>,
    /// Why it failed (`fail`, `info`).
    pub error: Option<String>,
    /// For a single-key view of a multi-key operation (`check::project`):
    /// that operation's kind (`BatchWrite`, `BatchRead`, `Scan`).
    pub part_of: Option<F>,
}

impl Op {
    /// The keys it names: one, or for a batch write or read, each of `key`
    /// split at `,` (none for a scan, shard or listing operation).
    pub fn keys(&self) -> Vec<&str> {
        match self.f {
            F::BatchWrite | F::BatchRead => self.key.split(',').filter(|k| !k.is_empty()).collect(),
            F::Write | F::Delete | F::Read | F::StaleRead => vec![self.key.as_str()],
            _ => Vec::new(),
        }
    }
}

/// The events of one run, in the order they happened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    /// Appends an event.
    pub fn push(&mut self, e: Event) {
        self.events.push(e);
    }

    /// The history as JSON lines.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            out.push_str(&serde_json::to_string(e).expect("events serialize"));
            out.push('\n');
        }
        out
    }

    /// Pairs invocations with completions. An invocation without completion
    /// (the run ended first) counts as `info`.
    ///
    /// Panics when a process completes an operation it never invoked: a bug
    /// in the workload, not in the system.
    pub fn ops(&self) -> Vec<Op> {
        let mut open: BTreeMap<u64, Op> = BTreeMap::new();
        // An invocation and its completion for nearly every operation.
        let mut done = Vec::with_capacity(self.events.len() / 2 + 1);
        for e in &self.events {
            match e.kind {
                EventType::Invoke => {
                    let op = Op {
                        process: e.process,
                        f: e.f,
                        client: e.client.clone(),
                        shard: e.shard,
                        key: e.key.clone(),
                        value: e.value.clone(),
                        invoke: e.time,
                        complete: None,
                        outcome: EventType::Info,
                        node: e.node.clone(),
                        staleness_ms: None,
                        requested_staleness_ms: e.staleness_ms,
                        error: None,
                        part_of: None,
                    };
                    assert!(open.insert(e.process, op).is_none(), "process {} invoked twice", e.process);
                }
                kind => {
                    let mut op =
                        open.remove(&e.process).unwrap_or_else(|| panic!("process {} completed nothing", e.process));
                    op.outcome = kind;
                    if kind != EventType::Info {
                        op.complete = Some(e.time);
                    }
                    if e.f.is_read() || matches!(e.f, F::NewShard | F::ListShards | F::ShardStats) {
                        op.value = e.value.clone();
                    }
                    if e.f == F::NewShard {
                        op.shard = e.shard;
                    }
                    op.node = e.node.clone();
                    op.staleness_ms = e.staleness_ms;
                    op.error = e.error.clone();
                    done.push(op);
                }
            }
        }
        done.extend(open.into_values());
        done
    }
}
