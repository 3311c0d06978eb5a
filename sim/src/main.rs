//! `attache-sim`: runs scenarios over seeds in the deterministic simulator,
//! replays one (scenario, seed) pair with a trace, and writes histories.
//!
//! Built with `RUSTFLAGS="--cfg madsim"`; `scripts/sim.sh` sets that and a
//! separate target dir:
//!
//! ```text
//! scripts/sim.sh run --all-scenarios --seeds 0..100
//! scripts/sim.sh run --scenario scenarios/primary-crash.toml --seeds 0..500
//! scripts/sim.sh replay --scenario scenarios/primary-crash.toml --seed 17 --trace-filter debug
//! scripts/sim.sh shrink --scenario scenarios/random.toml --seed 1234   # a failing seed
//! ```

/// mimalloc instead of the system allocator: a run allocates and frees
/// millions of small objects (tasks, timers, messages); measured on the
/// `random` scenario, 19% less CPU per seed. Allocation order does not
/// reach the simulation's decisions, so a (scenario, seed) pair replays the
/// same either way.
#[cfg(madsim)]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    eprintln!("attache-sim runs only in the simulation build: use scripts/sim.sh (it sets RUSTFLAGS=\"--cfg madsim\")");
    std::process::ExitCode::FAILURE
}

#[cfg(madsim)]
fn main() -> std::process::ExitCode {
    runner::main()
}

#[cfg(madsim)]
mod runner {
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;

    use attache_sim::report::{Failover, RunReport};
    use attache_sim::run::{replay_command, run_once, shrink_command};
    use attache_sim::scenario::Scenario;
    use clap::{Parser, Subcommand};
    use indicatif::{ProgressBar, ProgressStyle};

    #[derive(Parser)]
    #[command(name = "attache-sim", about = "Attaché's deterministic simulation runner")]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Run scenarios over a range of seeds and check every run.
        Run {
            /// Scenario files (repeatable).
            #[arg(long)]
            scenario: Vec<PathBuf>,
            /// Every scenario in `scenarios/` and `scenarios/regressions/`
            /// (not `scenarios/assumptions/`, which break an assumption on
            /// purpose and are expected to fail).
            #[arg(long)]
            all_scenarios: bool,
            /// Seeds, `A..B` (B excluded) or one number.
            #[arg(long, default_value = "0..20")]
            seeds: String,
            /// Write each run's history as JSON lines into this directory.
            #[arg(long)]
            history_out: Option<PathBuf>,
            /// Run the first N seeds of each scenario twice and fail if they differ.
            #[arg(long, default_value_t = 0)]
            check_determinism: u64,
            /// Worker threads, each running whole seeds on its own simulated
            /// runtime (runs are independent, so the results do not depend on
            /// it). Default: the machine's cores.
            #[arg(long, short = 'j', default_value_t = default_jobs())]
            jobs: usize,
        },
        /// Run one (scenario, seed) with a trace of messages, faults and state changes.
        Replay {
            #[arg(long)]
            scenario: PathBuf,
            /// Needed unless the scenario pins its seed.
            #[arg(long)]
            seed: Option<u64>,
            /// tracing-subscriber filter, e.g. `info`, `debug`, `attache_actors=trace`.
            #[arg(long, default_value = "info")]
            trace_filter: String,
            /// Write the history as JSON lines to this file.
            #[arg(long)]
            history_out: Option<PathBuf>,
        },
        /// Shrink a failing (scenario, seed) into a minimal scenario file that
        /// fails the same way: explicit faults found by delta debugging, the
        /// seed pinned, a shorter workload if it still fails.
        Shrink {
            #[arg(long)]
            scenario: PathBuf,
            #[arg(long)]
            seed: u64,
            /// Where to write it. Default:
            /// `scenarios/regressions/NAME-seed-SEED.toml`.
            #[arg(long)]
            out: Option<PathBuf>,
        },
    }

    fn default_jobs() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// Stack of a worker thread, in bytes: a whole simulated cluster runs on it.
    const WORKER_STACK_BYTES: usize = 64 << 20;

    /// One seed's result, sent from a worker to the thread that reports.
    struct SeedResult {
        seed: u64,
        report: RunReport,
        /// The digest of a second run of the same seed, when it was checked.
        again: Option<u64>,
    }

    /// Runs every seed of `s` on `jobs` threads, handing each result to
    /// `each` on the calling thread as it completes (not in seed order).
    /// Stops early, and returns the error, when `each` fails.
    fn run_seeds(
        s: &Scenario,
        seeds: std::ops::Range<u64>,
        determinism: u64,
        jobs: usize,
        mut each: impl FnMut(SeedResult) -> Result<(), String>,
    ) -> Result<(), String> {
        let next = std::sync::atomic::AtomicU64::new(seeds.start);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            for worker in 0..jobs.max(1) {
                let (tx, next, seeds) = (tx.clone(), &next, seeds.clone());
                std::thread::Builder::new()
                    .name(format!("sim-worker-{worker}"))
                    .stack_size(WORKER_STACK_BYTES)
                    .spawn_scoped(scope, move || loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= seeds.end {
                            break;
                        }
                        let report = run_once(s, seed);
                        let again = (seed - seeds.start < determinism).then(|| run_once(s, seed).digest());
                        if tx.send(SeedResult { seed, report, again }).is_err() {
                            break;
                        }
                    })
                    .expect("spawn a simulation worker thread");
            }
            drop(tx);
            rx.into_iter().try_for_each(&mut each)
        })
    }

    fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>, String> {
        let bad = || format!("--seeds {s:?}: expected A..B or a number");
        match s.split_once("..") {
            Some((a, b)) => Ok(a.parse().map_err(|_| bad())?..b.parse().map_err(|_| bad())?),
            None => {
                let n: u64 = s.parse().map_err(|_| bad())?;
                Ok(n..n + 1)
            }
        }
    }

    fn scenario_files(explicit: Vec<PathBuf>, all: bool) -> Result<Vec<PathBuf>, String> {
        let mut files = explicit;
        if all {
            for dir in [Path::new("scenarios"), Path::new("scenarios/regressions")] {
                let mut found: Vec<PathBuf> = match std::fs::read_dir(dir) {
                    Ok(entries) => entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                        .collect(),
                    Err(_) if dir.ends_with("regressions") => Vec::new(),
                    Err(e) => return Err(format!("cannot list {}: {e} (run from the repository root)", dir.display())),
                };
                found.sort();
                files.extend(found);
            }
        }
        if files.is_empty() {
            return Err("name a --scenario FILE or pass --all-scenarios".into());
        }
        Ok(files)
    }

    /// Wall-clock seconds, read outside the simulation.
    fn wall() -> std::time::Instant {
        std::time::Instant::now()
    }

    /// Prints failover time, from the fault that struck the old primary to the
    /// first write the new one acknowledged, and its parts (see
    /// `report::Failover`): p50, p99 and max of each, and the slowest failover
    /// with its cause.
    fn print_failovers(all: &[(attache_sim::report::Failover, String, u64)]) {
        let done: Vec<_> = all.iter().filter(|(f, _, _)| f.duration_ms.is_some()).collect();
        println!(
        "failovers: {} ({} without a write acknowledged by the new primary, {} without a fault that struck the old one)",
        all.len(),
        all.len() - done.len(),
        all.iter().filter(|(f, _, _)| f.cause.is_none()).count()
    );
        type Part = fn(&attache_sim::report::Failover) -> u64;
        let parts: [(&str, Part); 5] = [
            ("fault to writes again", |f| f.duration_ms.unwrap_or(0)),
            ("  detect (lease expiry)", |f| f.detect_ms),
            ("  wait (takeover, rank)", |f| f.wait_ms),
            ("  claim (CAS, fence)", |f| f.claim_ms),
            ("  first write", |f| f.first_write_ms.unwrap_or(0)),
        ];
        for (name, part) in parts.into_iter().filter(|_| !done.is_empty()) {
            let (p50, p99, max) = spread(done.iter().map(|(f, _, _)| part(f)).collect());
            println!("  {name:<24} p50 {p50:>6} ms  p99 {p99:>6} ms  max {max:>6} ms");
        }
        // The whole time by the kind of fault that caused it.
        let mut by_cause: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
        for (f, _, _) in &done {
            let kind = f.cause.as_deref().and_then(|c| c.split_whitespace().nth(2)).unwrap_or("no fault");
            by_cause.entry(kind).or_default().push(f.duration_ms.unwrap_or(0));
        }
        for (kind, ms) in by_cause {
            let n = ms.len();
            let (p50, p99, max) = spread(ms);
            println!("  after {kind:<20} p50 {p50:>6} ms  p99 {p99:>6} ms  max {max:>6} ms  ({n} failovers)");
        }
        if let Some((f, scenario, seed)) = done.iter().max_by_key(|(f, _, _)| f.duration_ms) {
            println!(
            "  slowest: {scenario} seed {seed}, {} {} -> {} at epoch {}: {} ms (detect {}, wait {}, claim {}, first write {}) after {}",
            f.volume,
            f.from,
            f.to,
            f.epoch,
            f.duration_ms.unwrap_or(0),
            f.detect_ms,
            f.wait_ms,
            f.claim_ms,
            f.first_write_ms.unwrap_or(0),
            f.cause.as_deref().unwrap_or("no fault")
        );
        }
    }

    /// p50, p99 and max of `ms` (0s when empty).
    fn spread(mut ms: Vec<u64>) -> (u64, u64, u64) {
        ms.sort_unstable();
        (percentile(&ms, 0.5), percentile(&ms, 0.99), ms.last().copied().unwrap_or(0))
    }

    fn percentile(sorted: &[u64], q: f64) -> u64 {
        sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
    }

    fn write_history(dir: &Path, report: &RunReport) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join(format!("{}-{}.jsonl", report.summary.scenario, report.summary.seed));
        std::fs::write(&file, report.outcome.history.to_jsonl()).map_err(|e| format!("{}: {e}", file.display()))
    }

    pub fn main() -> ExitCode {
        // No transparent huge pages for this process: mimalloc advises them
        // for its arenas, and where the kernel allows that (`madvise` mode,
        // common), the first touch of each 2 MiB region faults in and zeroes
        // all of it. Runs free their memory at the end of every seed and
        // fault it in again in the next. Measured on `random`, 40 seeds on
        // two jobs, four alternated runs: system time 0.84 s with huge pages
        // against 0.25 s without, about 3.5% of the run's CPU (the wall time
        // moved within this machine's noise). Memory layout does not reach
        // the simulation's decisions: a (scenario, seed) pair replays the
        // same either way (every scenario's histories, seeds 0..2, compared).
        // Best effort: a kernel without the prctl runs as before.
        #[cfg(target_os = "linux")]
        let _ = rustix::thread::disable_transparent_huge_pages(true);
        match Cli::parse().cmd {
            Cmd::Run { scenario, all_scenarios, seeds, history_out, check_determinism, jobs } => {
                match run(scenario, all_scenarios, &seeds, history_out, check_determinism, jobs) {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::FAILURE,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Cmd::Replay { scenario, seed, trace_filter, history_out } => {
                match replay(&scenario, seed, &trace_filter, history_out) {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::FAILURE,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Cmd::Shrink { scenario, seed, out } => match shrink(&scenario, seed, out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    }

    fn shrink(path: &Path, seed: u64, out: Option<PathBuf>) -> Result<(), String> {
        let s = Scenario::load(path)?;
        let pb = ProgressBar::new_spinner();
        pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("template"));
        let mut still = 0usize;
        let shrunk = attache_sim::shrink::shrink(&s, seed, |trial, failed| {
            still += usize::from(failed);
            pb.set_message(format!("trial {trial}, {still} still failing"));
            pb.tick();
        })?;
        pb.finish_and_clear();
        let seed = shrunk.scenario.seed.unwrap_or(seed);
        let out = out.unwrap_or_else(|| PathBuf::from(format!("scenarios/regressions/{}-seed-{seed}.toml", s.name)));
        let mut scenario = shrunk.scenario;
        scenario.name =
            out.file_stem().map_or_else(|| format!("{}-seed-{seed}", s.name), |n| n.to_string_lossy().into());
        let first = &shrunk.violations.first().or(shrunk.original.first()).expect("a failing run has a violation");
        scenario.description = format!(
            "Shrunk by `attache-sim shrink` from {} with seed {seed} ({} of {} faults kept, {} runs).\n\
             It failed with [{}] {}\n\
             Say here what bug it shows and which commit fixed it.\n",
            path.display(),
            shrunk.faults_after,
            shrunk.faults_before,
            shrunk.trials,
            first.checker,
            first.message.lines().next().unwrap_or(""),
        );
        let text = toml::to_string(&scenario).map_err(|e| format!("cannot write the scenario as TOML: {e}"))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
        println!(
            "{}: {} of {} faults kept after {} runs; it fails with:",
            out.display(),
            shrunk.faults_after,
            shrunk.faults_before,
            shrunk.trials
        );
        for v in shrunk.violations.iter().take(3) {
            println!("  [{}] {}", v.checker, v.message);
        }
        println!("replay it with: scripts/sim.sh replay --scenario {}", out.display());
        Ok(())
    }

    fn run(
        files: Vec<PathBuf>,
        all: bool,
        seeds: &str,
        history_out: Option<PathBuf>,
        determinism: u64,
        jobs: usize,
    ) -> Result<bool, String> {
        let seeds = parse_seeds(seeds)?;
        let files = scenario_files(files, all)?;
        let scenarios: Vec<(PathBuf, Scenario)> =
            files.into_iter().map(|p| Scenario::load(&p).map(|s| (p, s))).collect::<Result<_, _>>()?;
        let mut clean = true;
        let mut rows = Vec::new();
        let mut failing = Vec::new();
        // Every failover, with the scenario and seed of its run.
        let mut all_failovers: Vec<(Failover, String, u64)> = Vec::new();
        // Over every run: successful operations, and faults, by kind.
        let mut ops_by_kind: std::collections::BTreeMap<String, u64> = Default::default();
        let mut faults_by_kind: std::collections::BTreeMap<&'static str, u64> = Default::default();
        // What the volumes went through, summed; the longest linearizability
        // search (states, scenario, seed); faults aimed at a role nobody held.
        let mut volumes = attache_sim::ebs::VolumeCounts::default();
        let mut longest_search = (0u64, String::new(), 0u64);
        let mut skipped = 0u64;
        let total_wall = wall();
        for (path, s) in &scenarios {
            let pb = ProgressBar::new(seeds.end - seeds.start);
            pb.set_style(
                ProgressStyle::with_template("{prefix:>28} [{elapsed_precise}] {wide_bar} {pos}/{len} seeds {msg}")
                    .expect("template"),
            );
            pb.set_prefix(s.name.clone());
            let started = wall();
            let (mut ops, mut faults, mut failovers, mut violations, mut sim_ms) =
                (0u64, 0usize, Vec::<Failover>::new(), 0usize, 0u64);
            // A scenario that pins its seed runs that one seed.
            let seeds = s.seed.map_or(seeds.clone(), |pinned| pinned..pinned + 1);
            pb.set_length(seeds.end - seeds.start);
            run_seeds(s, seeds.clone(), determinism, jobs, |SeedResult { seed, report, again }| {
                if let Some(again) = again {
                    let first = report.digest();
                    if first != again {
                        clean = false;
                        failing.push((path.clone(), seed));
                        pb.suspend(|| {
                            println!(
                                "NONDETERMINISTIC: {} seed {seed}: two runs differ ({first:x} vs {again:x})",
                                s.name
                            )
                        });
                    }
                }
                if let Some(dir) = &history_out {
                    write_history(dir, &report)?;
                }
                ops += report.summary.ops.invoked;
                faults += report.summary.faults.len();
                for (kind, n) in &report.summary.ops.ok_by_kind {
                    *ops_by_kind.entry(kind.clone()).or_default() += n;
                }
                for f in &report.outcome.faults {
                    *faults_by_kind.entry(f.fault.kind()).or_default() += 1;
                }
                volumes.add(&report.outcome.volumes);
                skipped += report.outcome.skipped_faults;
                if report.summary.longest_search > longest_search.0 {
                    longest_search = (report.summary.longest_search, s.name.clone(), seed);
                }
                sim_ms += report.outcome.sim_ms;
                failovers.extend(report.summary.failovers.iter().cloned());
                all_failovers.extend(report.summary.failovers.iter().map(|f| (f.clone(), s.name.clone(), seed)));
                if !report.summary.violations.is_empty() {
                    clean = false;
                    violations += report.summary.violations.len();
                    for v in report.summary.violations.iter().take(3) {
                        pb.suspend(|| println!("VIOLATION {} seed {seed}: [{}] {}", s.name, v.checker, v.message));
                    }
                    failing.push((path.clone(), seed));
                }
                pb.set_message(format!("{violations} violations"));
                pb.inc(1);
                Ok(())
            })?;
            pb.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            rows.push((
                s.name.clone(),
                seeds.end - seeds.start,
                ops,
                faults,
                failovers.len(),
                violations,
                sim_ms as f64 / 1000.0 / secs,
                secs,
            ));
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max("scenario".len());
        println!(
            "{:<w$} {:>6} {:>9} {:>7} {:>9} {:>10} {:>12} {:>9}",
            "scenario", "runs", "ops", "faults", "failovers", "violations", "sim s/wall s", "wall s"
        );
        for (name, runs, ops, faults, fo, v, rate, secs) in &rows {
            println!("{name:<w$} {runs:>6} {ops:>9} {faults:>7} {fo:>9} {v:>10} {rate:>12.1} {secs:>9.1}");
        }
        let wall_total = total_wall.elapsed().as_secs_f64();
        let runs: u64 = rows.iter().map(|r| r.1).sum();
        println!(
            "{runs} runs in {wall_total:.1} s ({:.1} seeds/min with --jobs {jobs})",
            runs as f64 / wall_total * 60.0
        );
        let join = |m: Vec<String>| if m.is_empty() { "none".to_string() } else { m.join(", ") };
        println!(
            "successful operations by kind: {}",
            join(ops_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect())
        );
        println!("faults by kind: {}", join(faults_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect()));
        if skipped > 0 {
            println!("faults skipped (aimed at a role no node held, or their moment never came): {skipped}");
        }
        println!(
            "volumes: {} writes fenced off, {} torn tails left by crashes, {} shard lock conflicts, {} failed syncs \
             ({} of them durable anyway), {} writes refused by a full volume, {} appends written back before a sync",
            volumes.fenced_writes,
            volumes.torn_tails,
            volumes.lock_conflicts,
            volumes.failed_syncs,
            volumes.failed_syncs_durable,
            volumes.full_writes,
            volumes.written_back
        );
        println!(
            "longest linearizability search: {} states for one key ({} seed {}; a key past 2000000 fails its run)",
            longest_search.0, longest_search.1, longest_search.2
        );
        if !all_failovers.is_empty() {
            print_failovers(&all_failovers);
        }
        if !failing.is_empty() {
            failing.sort();
            failing.dedup();
            println!("\nfailing runs; replay each, or shrink it to a minimal scenario, with:");
            for (path, seed) in &failing {
                println!("  {}", replay_command(path, *seed));
                println!("  {}", shrink_command(path, *seed));
            }
        }
        Ok(clean)
    }

    fn replay(path: &Path, seed: Option<u64>, filter: &str, history_out: Option<PathBuf>) -> Result<bool, String> {
        let s = Scenario::load(path)?;
        let seed = match (s.seed, seed) {
            (Some(pinned), Some(asked)) if pinned != asked => {
                return Err(format!("{} pins seed {pinned}; drop --seed {asked}", path.display()))
            }
            (Some(seed), _) | (None, Some(seed)) => seed,
            (None, None) => return Err(format!("{} pins no seed: pass --seed N", path.display())),
        };
        let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("--trace-filter: {e}"))?;
        tracing_subscriber::fmt().with_env_filter(filter).with_timer(SimTime).with_writer(std::io::stderr).init();
        let report = run_once(&s, seed);
        if let Some(file) = history_out {
            std::fs::write(&file, report.outcome.history.to_jsonl()).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        println!("{}", serde_json::to_string_pretty(&report.summary).expect("summary serializes"));
        Ok(report.summary.violations.is_empty())
    }

    /// Log timestamps in simulated time since the runtime started.
    struct SimTime;

    impl tracing_subscriber::fmt::time::FormatTime for SimTime {
        fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
            match madsim::runtime::Handle::try_current() {
                Ok(_) => {
                    let t = madsim::time::TimeHandle::current().elapsed();
                    write!(w, "{:>9.3}s", t.as_secs_f64())
                }
                Err(_) => write!(w, "{:>10}", "-"),
            }
        }
    }
}
