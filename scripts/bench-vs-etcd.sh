#!/usr/bin/env bash
# Runs the same `attache bench` workloads against `attache dev` and against
# etcd, both started here on free loopback ports with their data in one
# temporary directory (same disk), and prints each table and the ratio of
# throughputs (Attaché / etcd).
#
# Usage: scripts/bench-vs-etcd.sh
# Environment (defaults in brackets):
#   WORKLOADS [a put]   RECORDS [10000]   OPERATIONS [50000]   VALUE_SIZE [100]
#   IN_FLIGHT [64]      CONNECTIONS [4]   ETCD [etcd]          TMPDIR [/tmp]
#   ATTACHE_BIN: an attache binary to use instead of building one (cargo build).
# Needs: etcd (apt-get install etcd-server), python3; both are installed by
# scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKLOADS=${WORKLOADS:-a put}
RECORDS=${RECORDS:-10000}
OPERATIONS=${OPERATIONS:-50000}
VALUE_SIZE=${VALUE_SIZE:-100}
IN_FLIGHT=${IN_FLIGHT:-64}
CONNECTIONS=${CONNECTIONS:-4}
ETCD=${ETCD:-etcd}

if [[ -z "${ATTACHE_BIN:-}" ]]; then
  cargo build -q -p attache-runtime --bin attache
  ATTACHE_BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/attache
fi
command -v "$ETCD" >/dev/null || { echo "bench-vs-etcd: no $ETCD on PATH (apt-get install etcd-server)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# attache dev, on a free port: wait for the line that says where it listens.
"$ATTACHE_BIN" dev --listen 127.0.0.1:0 --data-dir "$work/attache" >"$work/attache.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  addr=$(sed -n 's/.*serving gRPC on \([^ ]*\).*/\1/p' "$work/attache.log" | head -1)
  [[ -n "$addr" ]] && break
  sleep 0.1
done
[[ -n "${addr:-}" ]] || { cat "$work/attache.log" >&2; echo "bench-vs-etcd: attache dev did not start" >&2; exit 1; }

client=$(free_port); peer=$(free_port)
"$ETCD" --name bench --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "bench=http://127.0.0.1:$peer" --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)
etcd_ready=
for _ in $(seq 300); do
  if "$ATTACHE_BIN" bench --target "etcd://127.0.0.1:$client" --records 1 --operations 1 --in-flight 1 >/dev/null 2>&1; then
    etcd_ready=1
    break
  fi
  sleep 0.1
done
[[ -n "$etcd_ready" ]] || { cat "$work/etcd.log" >&2; echo "bench-vs-etcd: etcd did not start" >&2; exit 1; }
echo "attache dev on $addr, $("$ETCD" --version | head -1) on 127.0.0.1:$client, data in $work"

run() { # target workload out.json
  "$ATTACHE_BIN" bench --target "$1" --workload "$2" --records "$RECORDS" --operations "$OPERATIONS" \
    --value-size "$VALUE_SIZE" --in-flight "$IN_FLIGHT" --connections "$CONNECTIONS" --json >"$3"
}

for w in $WORKLOADS; do
  run "attache://$addr" "$w" "$work/attache-$w.json"
  run "etcd://127.0.0.1:$client" "$w" "$work/etcd-$w.json"
  python3 - "$work/attache-$w.json" "$work/etcd-$w.json" <<'PY'
import json, sys
reports = [json.load(open(p)) for p in sys.argv[1:]]
r0 = reports[0]
print(f"\nworkload {r0['workload']} ({r0['mix']}, {r0['distribution']}): {r0['records']} records of "
      f"{r0['value_size']} B, {r0['connections']} connections, {r0['in_flight']} in flight")
print(f"{'target':<8} {'phase':<5} {'op':<17} {'ok':>8} {'errors':>6} {'ops/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7}")
totals = []
for r in reports:
    for p in r["phases"]:
        for o in p["ops"]:
            print(f"{r['target']:<8} {p['phase']:<5} {o['op']:<17} {o['ok']:>8} {o['errors']:>6} {o['ops_per_sec']:>9.0f} "
                  f"{o['p50_ms']:>7.3f} {o['p99_ms']:>7.3f} {o['p999_ms']:>8.3f} {o['max_ms']:>7.3f}")
    run = [p for p in r["phases"] if p["phase"] == "run"][0]
    totals.append(run["ops_per_sec"])
    if run["errors"]:
        print(f"{r['target']}: {run['errors']} errors", file=sys.stderr)
print(f"run phase throughput, attache / etcd: {totals[0]:.0f} / {totals[1]:.0f} ops/s = {totals[0] / totals[1]:.2f}x")
PY
done
