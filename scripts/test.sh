#!/usr/bin/env bash
# Runs every test: the normal build (actix + RocksDB + real processes + etcd)
# and the deterministic simulation build (RUSTFLAGS="--cfg madsim"), each in
# its own target dir so neither rebuilds the other. Prints how long each phase
# took, so a slow CI run shows where its time went.
#
# Needs the system packages scripts/install-deps.sh installs (the README's
# set-up and .ci/run call it).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
sim_flags="--cfg madsim"
sim_crates=(-p attache-actors -p attache-faults -p attache-sim)
# Extra cargo settings (a TOML file), as .ci/run passes .ci/cargo-ci.toml.
cargo=(cargo)
if [ -n "${ATTACHE_CARGO_CONFIG:-}" ]; then cargo+=(--config "$ATTACHE_CARGO_CONFIG"); fi

phase_start=$(date +%s)
phase() {
    local now
    now=$(date +%s)
    if [ -n "${phase_name:-}" ]; then echo "== done: $phase_name in $((now - phase_start)) s"; fi
    phase_name="$1"
    phase_start=$now
    if [ -n "$phase_name" ]; then echo "== $phase_name"; fi
}

phase "ARCHITECTURE.md names every module, type and scenario as the code has them; scripts parse"
scripts/check-architecture.sh
for script in scripts/*.sh .ci/run; do bash -n "$script"; done

phase "normal build: cargo test --workspace --all-targets --no-run (RocksDB's C++ is most of a cold build)"
CARGO_TARGET_DIR="$target" "${cargo[@]}" test --workspace --all-targets --no-run

phase "simulation build: RUSTFLAGS='$sim_flags', target dir $target/madsim"
RUSTFLAGS="$sim_flags" CARGO_TARGET_DIR="$target/madsim" "${cargo[@]}" test "${sim_crates[@]}" --no-run
RUSTFLAGS="$sim_flags" CARGO_TARGET_DIR="$target/madsim" "${cargo[@]}" build -p attache-sim --bin attache-sim

phase "normal tests: cargo test --workspace --all-targets, then doc tests"
CARGO_TARGET_DIR="$target" "${cargo[@]}" test --workspace --all-targets
CARGO_TARGET_DIR="$target" "${cargo[@]}" test --workspace --doc

phase "simulation tests: RUSTFLAGS='$sim_flags' cargo test ${sim_crates[*]}"
RUSTFLAGS="$sim_flags" CARGO_TARGET_DIR="$target/madsim" "${cargo[@]}" test "${sim_crates[@]}"

phase "simulation runs: every scenario (random-swarm too: 22 drawn clusters), 22 seeds each (over 450 runs), the first 2 replayed to check determinism"
# The test build's binary, built above (not the `sim` profile's: one build less).
ATTACHE_SIM_PROFILE=dev CARGO_TARGET_DIR="$target" scripts/sim.sh run --all-scenarios --seeds 0..22 --check-determinism 2

phase ""
