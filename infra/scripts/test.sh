#!/usr/bin/env bash
# The test command of the README (and of CI): installs what the tests need into .local-aws/
# (moto, cfn-lint, cargo-lambda: virtual environments, nothing system-wide), starts a local
# SQS/DynamoDB/Secrets Manager on 127.0.0.1, then checks formatting, lints and the crates'
# dependency direction, runs every test,
# lints the SAM template and builds the Lambda functions.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p .local-aws
source infra/scripts/local-aws.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
bash infra/scripts/check-deps.sh

local_aws_start
# The reliability suite writes one report per scenario here; docs/RELIABILITY.md must match them.
rm -rf target/reliability
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi
cargo run --quiet --locked -p relink-bench -- reliability --check

bash infra/scripts/lint-template.sh
bash infra/scripts/build-functions.sh
