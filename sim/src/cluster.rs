//! The simulated cluster (built with `--cfg madsim` only): one metadata node
//! running the embedded store behind its gRPC service, N storage nodes
//! running the real `Node` actor and `AttacheService` over madsim-tonic, M
//! client nodes running the workload, and the fault driver, all on one
//! seeded madsim runtime. Only the outside world is simulated: network and
//! time (madsim), volumes ([`SimEbs`]) and the engine ([`SimVolumes`]).
//! Every server authenticates by bearer token as `--token-file` makes
//! `attache node` and `attache meta` do ([`token_file`]): clients call as
//! themselves, storage nodes call the metadata store as nodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use attache_actors::auth::{token_hash, Authenticator, BearerToken, TokenFile, NODE_GROUP};
use attache_actors::lease::{DriftClock, LeaseGate, LeaseTiming};
use attache_actors::local_store::MemLocalStore;
use attache_actors::meta::embedded::EmbeddedBackend;
use attache_actors::meta::remote::{MetadataServer, RemoteBackend};
use attache_actors::meta::MetaOps;
use attache_actors::node::{NodeConfig, NodeParts, WaitReady};
use attache_actors::retry::RetryPolicy;
use attache_actors::service::AttacheService;
use attache_actors::volume::{ClaimLog, Claimed, FailoverTiming};
use attache_actors::HostHandle;
use attache_faults::{random_schedule, Fault, Schedule, Scheduled, Target, Topology, MOMENT_WAIT_MS};
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use tokio::time::{Duration, Instant};

use crate::check::Disruption;
use crate::ebs::SimEbs;
use crate::engine::SimVolumes;
use crate::metalog::SimMetaLog;
use crate::report::{ClaimRecord, RunOutcome};
use crate::scenario::Scenario;
use crate::workload::{run_client, Recorder, Registry};
use crate::TaskHost;

const META_ADDR: &str = "10.0.0.1:7300";

/// The bearer token of `name` (`client-{j}`, `node-{i}`) in the simulated
/// cluster. Fixed strings, not drawn: identities take nothing from the seed.
pub fn token_of(name: &str) -> String {
    format!("sim-token-of-{name}")
}

/// The token file every simulated server reads, as `attache node` and
/// `attache meta` would with `--token-file`: each client `client-{j}` of
/// `s` as itself, each storage node `node-{i}` in the group of nodes. Made
/// as text and parsed, as a server reads its file.
pub fn token_file(s: &Scenario) -> TokenFile {
    let clients = (1..=s.cluster.clients).map(|j| (format!("client-{j}"), ""));
    let nodes = (1..=s.cluster.storage_nodes).map(|i| (format!("node-{i}"), NODE_GROUP));
    let text: String = clients
        .chain(nodes)
        .map(|(name, group)| format!("{} {name} {group}\n", token_hash(&token_of(&name))))
        .collect();
    TokenFile::parse(&text).expect("the simulated token file parses")
}

fn storage_addr(i: usize) -> String {
    format!("10.0.1.{i}:7400")
}

/// The fault schedule of a run: the scripted faults plus, when the scenario
/// has one, a random schedule drawn from `seed`.
pub fn schedule(s: &Scenario, seed: u64) -> Schedule {
    let mut faults: Vec<Scheduled> = s.faults.clone();
    if let Some(r) = &s.random {
        let clients = (1..=s.cluster.clients).map(|j| format!("client-{j}")).collect();
        let topo = Topology { nodes: s.nodes(), volumes: s.volumes(), meta: "meta".into(), clients };
        faults.extend(random_schedule(seed, &r.rates, &topo, r.start_ms, r.end_ms).faults);
    }
    Schedule::new(faults)
}

/// Storage nodes and the metadata node, by name, and the client nodes.
struct Nodes {
    handles: BTreeMap<String, NodeHandle>,
    /// `client-1`...: faults only partition them.
    clients: BTreeMap<String, madsim::task::NodeId>,
    /// Each storage node's local files (its node id, once allocated).
    locals: BTreeMap<String, MemLocalStore>,
    /// The metadata node's clock (it measures lease expiry), which survives
    /// the node's restarts as a machine's clock does.
    meta_clock: Arc<DriftClock>,
    gates: Arc<Mutex<BTreeMap<String, Arc<LeaseGate>>>>,
    /// Per node, how many scheduled crashes and restarts it has had.
    generations: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Nodes {
    fn id(&self, name: &str) -> madsim::task::NodeId {
        match self.handles.get(name) {
            Some(h) => h.id(),
            None => *self.clients.get(name).unwrap_or_else(|| panic!("the scenario names an unknown node {name}")),
        }
    }

    /// The node id the storage node `name` was allocated (`u64::MAX` before
    /// it has one): backups rank by it for a takeover.
    fn node_id(&self, name: &str) -> u64 {
        let file = self.locals.get(name).and_then(|l| l.get(attache_actors::node::NODE_ID_FILE));
        file.and_then(|b| String::from_utf8(b).ok()?.trim().parse().ok()).unwrap_or(u64::MAX)
    }

    /// Every node: storage, metadata and clients.
    fn all_ids(&self) -> Vec<madsim::task::NodeId> {
        self.handles.values().map(NodeHandle::id).chain(self.clients.values().copied()).collect()
    }
}

/// What the fault driver keeps between faults.
#[derive(Default)]
struct DriverState {
    /// Links a partition or isolation cut, for the next heal.
    clogged: Vec<(madsim::task::NodeId, madsim::task::NodeId)>,
    /// Storage nodes crashed or paused by a fault, not yet restarted or resumed.
    down: std::collections::BTreeSet<String>,
    /// A role (`primary:vol-1`) → the node it named when its disruption struck,
    /// for its repair.
    resolved: BTreeMap<String, String>,
    /// How many slow-network windows started, so only the last one's end
    /// restores the network.
    slow_windows: Arc<Mutex<u64>>,
    /// Faults not applied: aimed at a role no node held, or waiting for a
    /// moment that did not come, and the repairs of the latter.
    skipped: u64,
    /// Disruptions skipped because their moment did not come: their repairs
    /// are skipped too.
    unapplied: Vec<Fault>,
}

/// The node a fault's name stands for now (see [`Target`]): a name as it
/// is; a role, the node holding it that no fault holds down (the primary:
/// the holder of the volume's storage fence, or, for a fault that waited
/// for a moment on that volume, the node whose moment it was; the backup
/// next in line: the attached node with the lowest node id other than the
/// holder, as backups rank for a takeover). `None` when no node holds the role.
fn resolve(
    name: &str,
    nodes: &Nodes,
    ebs: &SimEbs,
    down: &std::collections::BTreeSet<String>,
    moment: Option<&(String, String)>,
) -> Option<String> {
    let holder = |v: &str| ebs.holder(v).map(|(n, _)| n);
    match Target::parse(name) {
        Target::Node(n) => Some(n.to_string()),
        Target::Primary(v) => {
            let at_moment = moment.filter(|(mv, _)| mv == v).map(|(_, n)| n.clone());
            at_moment.or_else(|| holder(v)).filter(|n| !down.contains(n))
        }
        Target::Backup(v) => {
            let holder = holder(v);
            ebs.attached(v)
                .into_iter()
                .filter(|n| Some(n) != holder.as_ref() && !down.contains(n))
                .min_by_key(|n| (nodes.node_id(n), n.clone()))
        }
    }
}

/// The fault with its roles replaced by the nodes holding them (see
/// [`resolve`]; `moment`: the (volume, node) of the moment it waited for);
/// a repair's role by the node its disruption struck. `None` when a role
/// names no node: the fault is skipped, and so is the repair of a fault
/// that was skipped (whose role then has no node to repair).
fn resolve_fault(
    fault: &Fault,
    nodes: &Nodes,
    ebs: &SimEbs,
    st: &mut DriverState,
    moment: Option<&(String, String)>,
) -> Option<Fault> {
    if fault.node_names().iter().all(|n| !Target::is_role(n)) {
        return Some(fault.clone());
    }
    let out = if fault.is_repair() {
        fault.map_nodes(|n| if Target::is_role(n) { st.resolved.remove(n) } else { Some(n.to_string()) })
    } else {
        let mut named = Vec::new();
        let out = fault.map_nodes(|n| {
            let node = resolve(n, nodes, ebs, &st.down, moment)?;
            named.push((n.to_string(), node.clone()));
            Some(node)
        });
        // Only a fault whose repair names its node (a crash, a pause, a
        // detach) leaves the node for that repair; the others end by
        // themselves or with a heal.
        let repaired_by_name =
            matches!(fault, Fault::NodeCrash { .. } | Fault::NodePause { .. } | Fault::EbsDetach { .. });
        if out.is_some() && repaired_by_name {
            st.resolved.extend(named.into_iter().filter(|(n, _)| Target::is_role(n)));
        }
        out
    };
    if out.is_none() {
        st.skipped += 1;
    }
    out
}

fn start_meta(handle: &Handle, log: SimMetaLog, clock: Arc<DriftClock>, auth: Authenticator) -> NodeHandle {
    handle
        .create_node()
        .name("meta")
        .ip("10.0.0.1".parse().expect("ip"))
        .init(move || {
            let (log, clock, auth) = (log.clone(), clock.clone(), auth.clone());
            async move {
                // A store that cannot recover (its disk fails) exits with the
                // error, and its supervisor starts it again a second later.
                let backend = loop {
                    let host = HostHandle::new(TaskHost);
                    match EmbeddedBackend::open_with_clock(&host, Arc::new(log.clone()), clock.clone()).await {
                        Ok(backend) => break backend,
                        Err(e) => {
                            tracing::warn!(error = %e, "metadata store failed to start; restarting in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                };
                let addr: SocketAddr = META_ADDR.parse().expect("addr");
                tonic::transport::Server::builder()
                    .add_service(MetadataServer::new(backend).with_auth(auth).into_server())
                    .serve(addr)
                    .await
                    .expect("metadata server");
            }
        })
        .build()
}

/// Where a storage node whose start-up failed reports that its process
/// exits (`attache node` returns the error and the process ends).
type Exits = tokio::sync::mpsc::UnboundedSender<String>;

/// The claims every storage node made in a run (`Claimed`), collected for
/// the failover report.
#[derive(Clone)]
struct Claims {
    /// The run's start: claim times are ms since then.
    start: Instant,
    list: Arc<Mutex<Vec<ClaimRecord>>>,
}

impl Claims {
    /// The claim log of storage node `i` (`node-{i}`).
    fn log_for(&self, i: usize) -> ClaimLog {
        let (claims, node, addr) = (self.clone(), format!("node-{i}"), storage_addr(i));
        Arc::new(move |c: &Claimed| {
            let ms = |t: Instant| t.saturating_duration_since(claims.start).as_millis() as u64;
            claims.list.lock().expect("claims lock").push(ClaimRecord {
                volume: c.volume_id.clone(),
                node: node.clone(),
                addr: addr.clone(),
                epoch: c.epoch,
                gone_seen_ms: ms(c.gone_seen),
                started_ms: ms(c.started),
                serving_ms: ms(c.serving),
            });
        })
    }
}

/// Starts storage node `i`; returns it and its local files (which survive
/// its restarts).
fn start_storage(
    handle: &Handle,
    s: &Scenario,
    i: usize,
    ebs: &SimEbs,
    seed: u64,
    gates: &Arc<Mutex<BTreeMap<String, Arc<LeaseGate>>>>,
    (exits, claims): (&Exits, &Claims),
) -> (NodeHandle, MemLocalStore) {
    let name = format!("node-{i}");
    let claim_log = claims.log_for(i);
    let local = MemLocalStore::default();
    let files = local.clone();
    let (ebs, gates, volumes, nodes) = (ebs.clone(), gates.clone(), s.volumes(), s.cluster.storage_nodes);
    let auth = Authenticator::new(Some(token_file(s)), false);
    let token = BearerToken::new(&token_of(&name)).expect("a simulated token is a valid metadata value");
    let scan_page = s.cluster.scan_page;
    let max_open_shards = s.cluster.max_open_shards;
    // Volumes within 1/16 of their size of the freest count as equally free.
    let balanced_space = s.ebs.capacity_bytes / 16;
    let t = s.timing.clone();
    let (lease_gate, cas, request_ids) = (s.sim_only.lease_gate, s.sim_only.metadata_cas, s.sim_only.request_ids);
    let node_name = name.clone();
    let exits = exits.clone();
    let node = handle
        .create_node()
        .name(&name)
        .ip(format!("10.0.1.{i}").parse().expect("ip"))
        .init(move || {
            let (auth, token) = (auth.clone(), token.clone());
            let (local, ebs, gates, volumes, t, name, exits, claim_log) = (
                local.clone(),
                ebs.clone(),
                gates.clone(),
                volumes.clone(),
                t.clone(),
                node_name.clone(),
                exits.clone(),
                claim_log.clone(),
            );
            async move {
                // A new process: whatever locks the last one held ended with it.
                ebs.release_locks(&name);
                let vols = Arc::new(SimVolumes::new(ebs, name.clone()));
                let timing = LeaseTiming { drift: t.drift, margin_ms: t.margin_ms };
                let gate = Arc::new(if lease_gate { LeaseGate::new(timing.clone()) } else { LeaseGate::always_open() });
                // A restarted process runs on the same machine's clock: the
                // drift its last process had (`Fault::ClockJitter`) still holds.
                {
                    let mut all = gates.lock().expect("gates lock");
                    if let Some(before) = all.get(&name) {
                        gate.set_clock_rate(before.clock_rate());
                    }
                    all.insert(name.clone(), gate.clone());
                }
                let mut meta = MetaOps::new(
                    Arc::new(RemoteBackend::new(format!("http://{META_ADDR}")).with_token(token)),
                    RetryPolicy::default(),
                    seed ^ i as u64,
                );
                if !cas {
                    meta = meta.with_blind_claims();
                }
                let mut cfg = NodeConfig::cluster_member(i, nodes, "/", volumes);
                cfg.advertise_addr = storage_addr(i);
                cfg.lease_ttl_ms = t.lease_ttl_ms;
                cfg.lease = timing;
                cfg.failover = FailoverTiming {
                    poll_ms: t.poll_ms,
                    takeover_delay_ms: t.takeover_delay_ms,
                    rank_delay_ms: t.rank_delay_ms,
                    io_timeout_ms: t.io_timeout_ms,
                };
                cfg.metadata_wait_ms = 600_000;
                cfg.limits.request_window_ms = if request_ids { t.request_window_ms } else { 0 };
                cfg.limits.max_scan_page = scan_page;
                cfg.balanced_space_bytes = balanced_space;
                cfg.max_open_shards = max_open_shards;
                let parts = NodeParts {
                    meta,
                    local: Arc::new(local),
                    factory: vols.clone(),
                    provider: vols,
                    gate,
                    claims: Some(claim_log),
                };
                let (node, service) = AttacheService::start(&HostHandle::new(TaskHost), cfg, parts, auth);
                // As `attache node`: when start-up fails, the process exits
                // (its lease then lapses) and its supervisor starts it again.
                // (Unlike `attache node`, the simulated node serves gRPC from
                // the start rather than once ready; the regressions' runs
                // depend on that timing.)
                madsim::task::spawn(async move {
                    if let failed @ (Ok(Err(_)) | Err(_)) = node.send(WaitReady).await {
                        tracing::error!(?failed, "node start-up failed; the process exits");
                        let _ = exits.send(name);
                    }
                });
                let addr: SocketAddr = storage_addr(i).parse().expect("addr");
                tonic::transport::Server::builder().add_service(service).serve(addr).await.expect("attache server");
            }
        })
        .build();
    (node, files)
}

/// Applies one fault (its roles resolved, see [`resolve_fault`]).
fn apply(fault: &Fault, nodes: &Nodes, ebs: &SimEbs, metalog: &SimMetaLog, st: &mut DriverState) {
    let handle = Handle::current();
    let net = NetSim::current();
    let clogged = &mut st.clogged;
    match fault {
        Fault::NodeCrash { node } | Fault::NodeRestart { node } => {
            *nodes.generations.lock().expect("generations lock").entry(node.clone()).or_default() += 1;
            if matches!(fault, Fault::NodeRestart { .. }) {
                st.down.remove(node);
                handle.restart(nodes.id(node));
                return;
            }
            handle.kill(nodes.id(node));
            if node == "meta" {
                metalog.crash();
            } else {
                st.down.insert(node.clone());
                ebs.crash(node);
            }
        }
        Fault::NodePause { node } => {
            st.down.insert(node.clone());
            handle.pause(nodes.id(node))
        }
        Fault::NodeResume { node } => {
            st.down.remove(node);
            handle.resume(nodes.id(node))
        }
        Fault::Partition { from, to, both } => {
            for a in from {
                for b in to.iter().filter(|b| *b != a) {
                    let (a, b) = (nodes.id(a), nodes.id(b));
                    net.clog_link(a, b);
                    clogged.push((a, b));
                    if *both {
                        net.clog_link(b, a);
                        clogged.push((b, a));
                    }
                }
            }
        }
        Fault::Isolate { node } => {
            let id = nodes.id(node);
            for other in nodes.all_ids().into_iter().filter(|o| *o != id) {
                net.clog_link(id, other);
                net.clog_link(other, id);
                clogged.extend([(id, other), (other, id)]);
            }
        }
        Fault::Heal => {
            for (a, b) in clogged.drain(..) {
                net.unclog_link(a, b);
            }
        }
        Fault::NetworkSlow { min_ms, max_ms, loss_per_mille, for_ms } => {
            let base = madsim::net::Config::default();
            let window = {
                let mut n = st.slow_windows.lock().expect("slow windows lock");
                *n += 1;
                *n
            };
            let (lo, hi) = (Duration::from_millis(*min_ms), Duration::from_millis((*max_ms).max(*min_ms + 1)));
            let loss = f64::from(*loss_per_mille) / 1_000.0;
            net.update_config(|c| {
                c.send_latency = lo..hi;
                c.packet_loss_rate = loss;
            });
            let (windows, for_) = (st.slow_windows.clone(), Duration::from_millis(*for_ms));
            madsim::task::spawn(async move {
                tokio::time::sleep(for_).await;
                if *windows.lock().expect("slow windows lock") == window {
                    NetSim::current().update_config(|c| *c = base);
                }
            });
        }
        Fault::EbsDetach { volume, node } => ebs.detach(volume, node),
        Fault::EbsReattach { volume, node } => {
            if let Err(e) = ebs.attach(volume, node) {
                tracing::warn!(%volume, %node, error = %e, "reattach failed");
            }
        }
        Fault::DiskHang { volume, node } => ebs.hang(volume, node),
        Fault::DiskErrors { volume, node, for_ms } => ebs.fail_syncs(volume, node, Duration::from_millis(*for_ms)),
        Fault::DiskStall { volume, node, ms, for_ms } => {
            ebs.stall(volume, node, Duration::from_millis(*ms), Duration::from_millis(*for_ms))
        }
        Fault::MetadataUnavailable { for_ms } => {
            let meta = nodes.id("meta");
            net.clog_node(meta);
            let for_ = Duration::from_millis(*for_ms);
            madsim::task::spawn(async move {
                tokio::time::sleep(for_).await;
                NetSim::current().unclog_node(meta);
            });
        }
        Fault::MetadataDiskErrors { for_ms } => metalog.fail_for(Duration::from_millis(*for_ms)),
        Fault::DiskFull { volume, for_ms } => ebs.fill(volume, Duration::from_millis(*for_ms)),
        Fault::ClockJitter { node, ppm } => {
            let rate = 1.0 + *ppm as f64 / 1e6;
            if node == "meta" {
                nodes.meta_clock.set_rate(rate);
            } else if let Some(g) = nodes.gates.lock().expect("gates lock").get(node) {
                g.set_clock_rate(rate);
            }
        }
    }
}

/// Runs scenario `s` on the current madsim runtime (seeded with `seed`):
/// starts the cluster, the clients and the fault driver, waits for the
/// workload and its final reads, and returns what happened.
pub async fn simulate(s: &Scenario, seed: u64) -> RunOutcome {
    // Set (or cleared) for this run on this thread, before any node starts.
    match &s.buggify {
        Some(b) => attache_actors::buggify::enable(seed, b.probability),
        None => {
            attache_actors::buggify::disable();
        }
    }
    let handle = Handle::current();
    let start = Instant::now();
    let ebs = SimEbs::new(&s.volumes(), s.ebs.clone(), seed);
    let gates = Arc::new(Mutex::new(BTreeMap::new()));
    let mut handles = BTreeMap::new();
    let metalog = SimMetaLog::new(s.metadata.clone(), seed);
    let meta_clock = Arc::new(DriftClock::default());
    let meta_auth = Authenticator::new(Some(token_file(s)), false);
    handles.insert("meta".to_string(), start_meta(&handle, metalog.clone(), meta_clock.clone(), meta_auth));
    let (exits, mut exited) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut locals = BTreeMap::new();
    let claims = Claims { start, list: Arc::default() };
    for i in 1..=s.cluster.storage_nodes {
        let (node, local) = start_storage(&handle, s, i, &ebs, seed, &gates, (&exits, &claims));
        handles.insert(format!("node-{i}"), node);
        locals.insert(format!("node-{i}"), local);
    }
    let mut nodes = Nodes { handles, clients: BTreeMap::new(), locals, meta_clock, gates, generations: Arc::default() };
    // The supervisor: a process that exited (its start-up failed) is killed
    // at once and started again a second later, unless a scheduled fault
    // crashed or restarted it meanwhile (`Nodes::generation`).
    let generations = nodes.generations.clone();
    let ids: BTreeMap<String, madsim::task::NodeId> = nodes.handles.iter().map(|(n, h)| (n.clone(), h.id())).collect();
    madsim::task::spawn(async move {
        while let Some(name) = exited.recv().await {
            let Some(&id) = ids.get(&name) else { continue };
            let generation = generations.lock().expect("generations lock").get(&name).copied().unwrap_or(0);
            Handle::current().kill(id);
            let generations = generations.clone();
            madsim::task::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if generations.lock().expect("generations lock").get(&name).copied().unwrap_or(0) == generation {
                    tracing::info!(node = %name, "supervisor restarts the node after a failed start-up");
                    Handle::current().restart(id);
                }
            });
        }
    });

    let rec = Arc::new(Recorder::new());
    let registry: Registry = Arc::default();
    let end = start + Duration::from_millis(s.workload.duration_ms);
    let final_deadline = end + Duration::from_secs(60);
    let addrs: Vec<String> = (1..=s.cluster.storage_nodes).map(storage_addr).collect();
    let mut clients = Vec::new();
    for j in 1..=s.cluster.clients {
        let (spec, addrs, rec, registry) = (s.workload.clone(), addrs.clone(), rec.clone(), registry.clone());
        let node =
            handle.create_node().name(format!("client-{j}")).ip(format!("10.0.2.{j}").parse().expect("ip")).build();
        nodes.clients.insert(format!("client-{j}"), node.id());
        clients.push(node.spawn(run_client(j, spec, addrs, rec, registry, seed, end, final_deadline)));
    }

    let intrusions: Arc<Mutex<Vec<crate::check::Intrusion>>> = Arc::default();
    if s.workload.metadata_intrusion_ms > 0 {
        let node = handle.create_node().name("intruder").ip("10.0.3.1".parse().expect("ip")).build();
        let every = Duration::from_millis(s.workload.metadata_intrusion_ms);
        node.spawn(intrude(s.cluster.clients, every, seed, start, end, intrusions.clone()));
    }

    let schedule = schedule(s, seed);
    let mut applied = Vec::new();
    let mut st = DriverState::default();
    for (i, f) in schedule.faults.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(f.at_ms)).await;
        let repairs_unapplied = |u: &Fault| f.fault != Fault::Heal && crate::shrink::repairs(u, &f.fault);
        if let Some(k) = st.unapplied.iter().position(repairs_unapplied) {
            st.unapplied.remove(k);
            st.skipped += 1;
            tracing::info!(at_ms = f.at_ms, fault = ?f.fault, "repair skipped: its fault's moment never came");
            continue;
        }
        let mut moment_node = None;
        if let Some(when) = &f.when {
            let moment = attache_faults::Moment::parse(when).expect("validated with the scenario");
            // Never past the next scheduled fault: the schedule keeps its times.
            let next_ms = schedule.faults.get(i + 1).map_or(u64::MAX, |n| n.at_ms);
            let now_ms = start.elapsed().as_millis() as u64;
            let wait = MOMENT_WAIT_MS.min(next_ms.saturating_sub(now_ms));
            let came = tokio::time::timeout(Duration::from_millis(wait), ebs.wait_for(&moment)).await;
            match came {
                Ok(Ok(node)) => moment_node = Some((moment.volume().to_string(), node)),
                _ => {
                    tracing::info!(at_ms = f.at_ms, fault = ?f.fault, %when, "fault skipped: its moment never came");
                    st.skipped += 1;
                    st.unapplied.push(f.fault.clone());
                    continue;
                }
            }
        }
        let Some(fault) = resolve_fault(&f.fault, &nodes, &ebs, &mut st, moment_node.as_ref()) else {
            tracing::info!(at_ms = f.at_ms, fault = ?f.fault, "fault skipped: no node holds its role");
            continue;
        };
        // A fault that waited for its moment struck when it came.
        let at_ms = if f.when.is_some() { start.elapsed().as_millis() as u64 } else { f.at_ms };
        tracing::info!(at_ms, ?fault, when = ?f.when, "fault");
        apply(&fault, &nodes, &ebs, &metalog, &mut st);
        applied.push(Scheduled { at_ms, fault, when: f.when.clone() });
    }
    for c in clients {
        c.await.expect("client task");
    }
    // Kill every node so the executor drops their tasks: an actor's task
    // holds its own address, so a task left waiting on its mailbox would
    // never be freed, and a long seed range would run out of memory.
    for h in nodes.handles.values() {
        handle.kill(h.id());
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let buggified = attache_actors::buggify::disable().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let history = rec.take_history();
    // Of the faults applied: one aimed at a role no node held struck nobody.
    let disruptions = applied
        .iter()
        .map(|f| Disruption { at_ns: (f.at_ms + f.fault.recovery_from_ms()) * 1_000_000, repair: f.fault.is_repair() })
        .collect();
    let claims = std::mem::take(&mut *claims.list.lock().expect("claims lock"));
    let intrusions_made = std::mem::take(&mut *intrusions.lock().expect("intrusions lock"));
    RunOutcome {
        sim_ms: start.elapsed().as_millis() as u64,
        history,
        syncs: ebs.syncs(),
        faults: applied,
        buggified,
        metadata_disk: metalog.counts(),
        volumes: ebs.counts(),
        skipped_faults: st.skipped,
        disruptions,
        claims,
        intrusions: intrusions_made,
    }
}

/// The intruder (see `WorkloadSpec::metadata_intrusion_ms`): every `every`
/// until `end`, one call to the metadata endpoint as a client of the run
/// with its token (of `clients`), with an unknown token, or with none,
/// drawn from its own generator (seeded from `seed`), recorded in `log`.
async fn intrude(
    clients: usize,
    every: Duration,
    seed: u64,
    start: Instant,
    end: Instant,
    log: Arc<Mutex<Vec<crate::check::Intrusion>>>,
) {
    use attache_actors::meta::backend::{Txn, TxnOp};
    use attache_actors::meta::store::{node_key, volume_key, ROOT};
    use attache_actors::meta::{MetaError, MetadataBackend as _};
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x1a7d_0e5c_a11e_d0ff);
    let endpoint = format!("http://{META_ADDR}");
    while Instant::now() + every < end {
        tokio::time::sleep(every).await;
        let client = format!("client-{}", rng.random_range(1..=clients.max(1)));
        let (who, backend) = match rng.random_range(0..3) {
            0 => {
                let token = BearerToken::new(&token_of(&client)).expect("a valid token");
                (format!("token of {client}"), RemoteBackend::new(endpoint.clone()).with_token(token))
            }
            1 => {
                let token = BearerToken::new("sim-token-of-nobody").expect("a valid token");
                ("an unknown token".to_string(), RemoteBackend::new(endpoint.clone()).with_token(token))
            }
            _ => ("no token".to_string(), RemoteBackend::new(endpoint.clone())),
        };
        let volume = volume_key(&format!("vol-{}", rng.random_range(1..=3)));
        let node = node_key(rng.random_range(1..=5));
        let (what, result): (String, Result<(), MetaError>) = match rng.random_range(0..6) {
            0 => {
                let owner = br#"{"volume_id":"vol-1","node_id":999,"epoch":999999}"#;
                (format!("put {volume}"), backend.put(volume.as_bytes(), owner, 0).await.map(drop))
            }
            1 => (format!("delete {node}"), backend.delete(node.as_bytes()).await.map(drop)),
            2 => {
                let lease = rng.random_range(1..=20);
                (format!("revoke lease {lease}"), backend.lease_revoke(lease).await)
            }
            3 => {
                let success = (1..=3).map(|v| TxnOp::Delete { key: volume_key(&format!("vol-{v}")).into() }).collect();
                let txn = Txn { compare: Vec::new(), success, failure: Vec::new() };
                ("a txn deleting every volume's owner record".to_string(), backend.txn(txn).await.map(drop))
            }
            4 => (format!("range {ROOT}"), backend.range(ROOT.as_bytes()).await.map(drop)),
            _ => ("lease grant".to_string(), backend.lease_grant(60_000).await.map(drop)),
        };
        // Refused, or not answered (cut off, or no answer in time); any
        // other answer (a value, or an error the store gave after letting
        // the call in, such as a lease not found) means it was served.
        let answer = match result {
            Err(MetaError::Refused(_)) => "refused".to_string(),
            Err(e @ (MetaError::Unavailable(_) | MetaError::Timeout(_))) => format!("unanswered: {e}"),
            Ok(()) => "served".to_string(),
            Err(e) => format!("served: {e}"),
        };
        let at_ms = start.elapsed().as_millis() as u64;
        log.lock().expect("intrusions lock").push(crate::check::Intrusion {
            at_ms,
            call: format!("{who}: {what}"),
            answer,
        });
    }
}
