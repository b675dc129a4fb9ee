#!/usr/bin/env bash
# The test command of the README: checks formatting and lints, then runs every test of the
# workspace. Installs nothing system-wide; everything it needs comes from the registries.
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi
