#!/usr/bin/env bash
# Runs the deterministic simulation runner (attache-sim) in the madsim build:
# RUSTFLAGS="--cfg madsim" and its own target dir, so it never rebuilds the
# normal build. Arguments go to attache-sim, e.g.
#   scripts/sim.sh run --all-scenarios --seeds 0..100
#   scripts/sim.sh replay --scenario scenarios/primary-crash.toml --seed 17
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
# Extra cargo settings (a TOML file), as .ci/run passes .ci/cargo-ci.toml.
cargo=(cargo)
if [ -n "${ATTACHE_CARGO_CONFIG:-}" ]; then cargo+=(--config "$ATTACHE_CARGO_CONFIG"); fi
RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR="$target/madsim" "${cargo[@]}" run --quiet -p attache-sim --bin attache-sim -- "$@"
