//! `attache bench` as a user runs it: the real binary, every workload
//! against `attache dev` and the key-value workloads against a real etcd,
//! its JSON report checked for shape, counts and zero errors, and what the
//! run created deleted at the end. No figure is asserted (speed is measured,
//! not tested).

use std::process::Command;

use attache_actors::service::proto;
use serde_json::Value;

use crate::common::start_dev;
use crate::metadata::Etcd;

/// Runs `attache bench` with `args`; returns stdout, or panics with stderr.
async fn bench(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_attache")).arg("bench").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "attache bench {args:?} failed: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

/// Runs `attache bench --json` and returns the report.
async fn bench_json(target: &str, workload: &str, extra: &[&str]) -> Value {
    let mut args: Vec<String> = ["--target", target, "--workload", workload, "--records", "200", "--operations", "400"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["--in-flight", "8", "--connections", "2", "--json"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = bench(args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The operations a workload's run phase may report.
fn run_ops(workload: &str) -> &'static [&'static str] {
    match workload {
        "a" | "b" => &["read", "update"],
        "c" => &["read"],
        "d" => &["insert", "read"],
        "e" => &["insert", "scan"],
        "f" => &["read", "read-modify-write"],
        "put" => &["update"],
        _ => unreachable!(),
    }
}

/// Checks a report: both phases, every operation counted and successful,
/// latency quantiles in order.
fn check_report(r: &Value, target: &str, workload: &str, run_operations: u64) {
    assert_eq!(r["target"], target, "{r:#}");
    assert_eq!(r["workload"], workload);
    assert_eq!(r["records"], 200);
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.iter().map(|p| p["phase"].as_str().unwrap()).collect::<Vec<_>>(), ["load", "run"]);
    for (phase, expected) in phases.iter().zip([200, run_operations]) {
        assert_eq!(phase["errors"], 0, "{phase:#}");
        assert_eq!(phase["ok"], expected, "{phase:#}");
        assert!(phase["ops_per_sec"].as_f64().unwrap() > 0.0);
        let ops = phase["ops"].as_array().unwrap();
        let names: Vec<&str> = ops.iter().map(|o| o["op"].as_str().unwrap()).collect();
        let allowed = if phase["phase"] == "load" { &["insert"][..] } else { run_ops(workload) };
        assert!(names.iter().all(|n| allowed.contains(n)), "{workload}: {names:?}");
        assert_eq!(ops.iter().map(|o| o["ok"].as_u64().unwrap()).sum::<u64>(), expected);
        for o in ops {
            assert_eq!(o["errors"], 0, "{o:#}");
            assert!(o["errors_by_status"].as_object().unwrap().is_empty());
            let q: Vec<f64> =
                ["p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms"].iter().map(|k| o[k].as_f64().unwrap()).collect();
            assert!(q[0] > 0.0 && q.windows(2).all(|w| w[0] <= w[1]), "quantiles out of order: {o:#}");
        }
    }
    // Reads draw from every record loaded or inserted: each acknowledged
    // insert of the run extends them.
    let inserted: u64 = phases[1]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["op"] == "insert")
        .map(|o| o["ok"].as_u64().unwrap())
        .sum();
    assert_eq!(r["records_after"].as_u64().unwrap(), 200 + inserted, "{workload}");
    // The mix shows: workload a's run has both reads and updates.
    if workload == "a" {
        assert_eq!(phases[1]["ops"].as_array().unwrap().len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_workload_against_attache_dev() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_dev(dir.path(), &[]);
    let target = format!("attache://{}", node.addr);
    for workload in ["a", "b", "c", "d", "e", "f", "put"] {
        let r = bench_json(&target, workload, &["--shards", "2"]).await;
        check_report(&r, "attache", workload, 400);
        assert_eq!(r["shards"].as_array().unwrap().len(), 2);
    }
    // Every shard the runs created is deleted at the end.
    let mut c = node.client().await;
    let listed = c.list_shards(proto::ListShardsRequest { client_id: "bench".into() }).await.unwrap().into_inner();
    assert!(listed.shards.iter().all(|s| s.state == proto::ShardState::Deleted as i32), "{listed:?}");

    // --keep, then --skip-load on the kept shard, for a duration.
    let r = bench_json(&target, "c", &["--keep"]).await;
    let shard = r["shards"][0].as_u64().unwrap().to_string();
    let out = bench(
        [
            "--target",
            &target,
            "--workload",
            "b",
            "--records",
            "200",
            "--skip-load",
            "--shard",
            &shard,
            "--duration",
            "0.5",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(out.contains("phase op") && out.contains("run   read") && out.ends_with("errors: none\n"), "{out}");
    assert!(!out.contains("load  insert"), "--skip-load ran a load phase: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_the_key_value_workloads_against_etcd() {
    let etcd = Etcd::start().await;
    let target = format!("etcd://{}", etcd.endpoint());
    for workload in ["a", "e", "f", "put"] {
        let r = bench_json(&target, workload, &[]).await;
        check_report(&r, "etcd", workload, 400);
    }
    // The keys are deleted at the end.
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let left =
        c.get("attache-bench/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(left.count(), 0);
}

#[tokio::test]
async fn bench_refuses_bad_flags_with_a_reason() {
    for (args, reason) in [
        (&["--target", "redis://127.0.0.1:1"][..], "expected attache://HOST:PORT or etcd://HOST:PORT"),
        (&["--skip-load"][..], "--skip-load needs --shard"),
        (&["--in-flight", "0"][..], "--in-flight must be at least 1"),
        (&["--duration=0"][..], "--duration must be a positive number"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_attache")).arg("bench").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(reason), "{args:?}: {stderr}");
    }
}
