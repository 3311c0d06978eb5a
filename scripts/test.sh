#!/usr/bin/env bash
# Runs every test: the normal build (actix + RocksDB + real processes + etcd)
# and the deterministic simulation build (RUSTFLAGS="--cfg madsim"), each in
# its own target dir so neither rebuilds the other.
#
# Needs: clang + libclang-dev (RocksDB's bindgen), etcd-server (the etcd
# conformance test). .ci/run installs them on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== normal build: cargo test --workspace"
CARGO_TARGET_DIR="$target" cargo test --workspace --all-targets
CARGO_TARGET_DIR="$target" cargo test --workspace --doc

echo "== simulation build: RUSTFLAGS=--cfg madsim"
RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR="$target/madsim" cargo test -p attache-actors -p attache-faults -p attache-sim

echo "== simulation runs: every scenario, 20 seeds each, the first 2 replayed to check determinism"
CARGO_TARGET_DIR="$target" scripts/sim.sh run --all-scenarios --seeds 0..20 --check-determinism 2
