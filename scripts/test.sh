#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: starts (installing if needed) the servers
# the tests use, then checks formatting and lints, then runs every test. Cargo's target
# directory is kept outside the clone so repeated runs (and CI) reuse earlier builds.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gochat/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/services.sh up
eval "$(scripts/services.sh env)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
