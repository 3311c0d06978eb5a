//! Request limits, checked before a request touches any state, so a rejected
//! request changes nothing. All sizes are in bytes.

use serde::{Deserialize, Serialize};

use crate::error::AttacheError;

/// Default shard size limit: 2 GiB of live keys, values and index entries.
pub const DEFAULT_SHARD_SIZE_LIMIT: u64 = 2 << 30;

/// Longest request id, bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// Limits on one request. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Longest key, bytes (default 4 KiB). Keys must also be non-empty.
    pub max_key_bytes: usize,
    /// Longest value, bytes (default 1 MiB).
    pub max_value_bytes: usize,
    /// Most entries in one `BatchPut` or `BatchGet` (default 10,000).
    pub max_batch_entries: usize,
    /// Most key+value bytes in one `BatchPut` (default 16 MiB).
    pub max_batch_bytes: usize,
    /// Most secondary index entries on one put (default 16).
    pub max_indexes_per_put: usize,
    /// Longest index name, bytes (default 256); names must be non-empty.
    pub max_index_name_bytes: usize,
    /// Longest index value, bytes (default 4 KiB).
    pub max_index_value_bytes: usize,
    /// Most entries one scan page returns (default 10,000).
    pub max_scan_page: usize,
    /// How long a shard remembers the request id of a write it applied, ms
    /// of the primary's wall clock (default 10 minutes). A retry with the
    /// same id within the window is answered as the first attempt was and
    /// applies nothing. It must exceed a client's whole retry deadline
    /// (`ClientSettings::deadline_ms`, 30 s by default) plus the clock
    /// difference between nodes; it costs about 100 bytes of disk per write
    /// in the window. 0 turns the protection off (records are dropped by the
    /// next group commit).
    pub request_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4 << 10,
            max_value_bytes: 1 << 20,
            max_batch_entries: 10_000,
            max_batch_bytes: 16 << 20,
            max_indexes_per_put: 16,
            max_index_name_bytes: 256,
            max_index_value_bytes: 4 << 10,
            max_scan_page: 10_000,
            request_window_ms: 600_000,
        }
    }
}

fn invalid(msg: String) -> AttacheError {
    AttacheError::InvalidArgument(msg)
}

impl Limits {
    /// Checks a key. Errors: `InvalidArgument` when empty or over `max_key_bytes`.
    pub fn check_key(&self, key: &[u8]) -> Result<(), AttacheError> {
        if key.is_empty() {
            return Err(invalid("key is empty: every key needs at least one byte".into()));
        }
        if key.len() > self.max_key_bytes {
            return Err(invalid(format!(
                "key is {} bytes, over the limit of {} bytes: use a shorter key",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    /// Checks a value. Errors: `InvalidArgument` when over `max_value_bytes`.
    pub fn check_value(&self, value: &[u8]) -> Result<(), AttacheError> {
        if value.len() > self.max_value_bytes {
            return Err(invalid(format!(
                "value is {} bytes, over the limit of {} bytes: split it across keys",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Checks an index entry's name and value.
    pub fn check_index(&self, name: &str, value: &[u8]) -> Result<(), AttacheError> {
        if name.is_empty() || name.len() > self.max_index_name_bytes {
            return Err(invalid(format!("index name {name:?} must be 1 to {} bytes long", self.max_index_name_bytes)));
        }
        if value.len() > self.max_index_value_bytes {
            return Err(invalid(format!(
                "value of index {name:?} is {} bytes, over the limit of {} bytes",
                value.len(),
                self.max_index_value_bytes
            )));
        }
        Ok(())
    }

    /// Checks the shape of a batch of `entries` entries holding `bytes` bytes.
    pub fn check_batch(&self, entries: usize, bytes: usize) -> Result<(), AttacheError> {
        if entries == 0 {
            return Err(invalid("batch is empty: send at least one entry".into()));
        }
        if entries > self.max_batch_entries {
            return Err(invalid(format!(
                "batch has {entries} entries, over the limit of {}: split it into smaller batches",
                self.max_batch_entries
            )));
        }
        if bytes > self.max_batch_bytes {
            return Err(invalid(format!(
                "batch holds {bytes} bytes, over the limit of {} bytes: split it into smaller batches",
                self.max_batch_bytes
            )));
        }
        Ok(())
    }

    /// Checks a client id. Errors: `InvalidArgument` when empty or over 256 bytes.
    pub fn check_client_id(&self, client_id: &str) -> Result<(), AttacheError> {
        if client_id.is_empty() || client_id.len() > 256 {
            return Err(invalid(format!(
                "client id {client_id:?} must be 1 to 256 bytes long: pick a stable name for your application"
            )));
        }
        Ok(())
    }

    /// Checks a write's request id (empty: none). Errors: `InvalidArgument`
    /// when over [`MAX_REQUEST_ID_BYTES`].
    pub fn check_request_id(&self, request_id: &str) -> Result<(), AttacheError> {
        if request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(invalid(format!(
                "request id is {} bytes, over the limit of {MAX_REQUEST_ID_BYTES}: use a random id of 16 bytes \
                 (32 hex digits), the same for every retry of one write",
                request_id.len()
            )));
        }
        Ok(())
    }

    /// The scan page size to use for a requested `limit` (0 = as many as allowed).
    pub fn scan_page(&self, limit: u32) -> usize {
        match limit as usize {
            0 => self.max_scan_page,
            n => n.min(self.max_scan_page),
        }
    }
}
