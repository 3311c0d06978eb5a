//! `LocalStore`: a node's small durable files in its own data directory (not
//! on a shared volume), such as its node id. Production writes files with
//! fsync (`attache-runtime`); the simulation keeps them per simulated node so
//! they survive a simulated restart; tests keep them in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

/// Named small files, each read and replaced whole.
#[async_trait]
pub trait LocalStore: Send + Sync + 'static {
    /// The contents of `name`, if it exists. Errors: an I/O message.
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, String>;
    /// Replaces `name` with `bytes`, durably (written, synced, renamed into
    /// place) before returning. Errors: an I/O message.
    async fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String>;
}

/// A `LocalStore` in memory; clones share it.
#[derive(Clone, Default, Debug)]
pub struct MemLocalStore(Arc<Mutex<BTreeMap<String, Vec<u8>>>>);

impl MemLocalStore {
    /// The contents of `name`, if it exists, read without waiting (for the
    /// simulation's fault driver, which asks which node id a node holds).
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.lock().expect("local store lock").get(name).cloned()
    }
}

#[async_trait]
impl LocalStore for MemLocalStore {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().expect("local store lock").get(name).cloned())
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        self.0.lock().expect("local store lock").insert(name.to_string(), bytes.to_vec());
        Ok(())
    }
}
