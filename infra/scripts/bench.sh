#!/usr/bin/env bash
# Every benchmark of docs/BENCHMARKS.md in one run: builds the Lambda functions and the
# baselines (a hello-world lambda_runtime binary; bench-sdk, a minimal SDK Lambda) with the
# release profile for x86_64 and arm64 (cargo lambda), starts the local SQS/DynamoDB/Secrets
# Manager (moto), then measures size, the cold first event and the time to the first poll,
# clearing under the service protection limits and pipeline overhead, and rewrites
# docs/BENCHMARKS.md.
# Takes about 25 minutes on 2 cores (two LTO builds, then ~5 minutes of measurements).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .local-aws
bash infra/scripts/build-functions.sh -p bench-hello -p bench-sdk
bash infra/scripts/build-functions.sh --arm64 -p bench-hello
source infra/scripts/local-aws.sh
local_aws_start
cargo run --locked --profile measure -p relink-bench -- all "$@"
