#!/usr/bin/env bash
# Runs the reliability suite (tests/reliability.rs) against a local SQS/DynamoDB/Secrets Manager
# and rewrites docs/RELIABILITY.md from the reports its scenarios write.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .local-aws
source infra/scripts/local-aws.sh
local_aws_start
rm -rf target/reliability
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --locked -p relink --test reliability --no-fail-fast
else
  cargo test --locked -p relink --test reliability
fi
cargo run --quiet --locked -p relink-bench -- reliability
