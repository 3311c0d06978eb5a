#!/usr/bin/env bash
# Runs the deterministic simulation runner (attache-sim) in the madsim build:
# RUSTFLAGS="--cfg madsim" and its own target dir, so it never rebuilds the
# normal build. Arguments go to attache-sim, e.g.
#   scripts/sim.sh run --all-scenarios --seeds 0..100
#   scripts/sim.sh replay --scenario scenarios/primary-crash.toml --seed 17
#
# The binary is built in the `sim` profile (Cargo.toml: every crate
# optimized and link-time optimized, debug assertions and overflow checks
# on), which runs seeds about 1.8 times as fast as CI's test build; its first
# build takes a few minutes more. ATTACHE_SIM_PROFILE=dev reuses the test
# build instead (scripts/test.sh does). A run is the same in either: same
# histories, same digests.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
profile="${ATTACHE_SIM_PROFILE:-sim}"
# Extra cargo settings (a TOML file), as .ci/run passes .ci/cargo-ci.toml.
cargo=(cargo)
if [ -n "${ATTACHE_CARGO_CONFIG:-}" ]; then cargo+=(--config "$ATTACHE_CARGO_CONFIG"); fi
RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR="$target/madsim" "${cargo[@]}" run --quiet --profile "$profile" -p attache-sim --bin attache-sim -- "$@"
