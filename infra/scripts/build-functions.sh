#!/usr/bin/env bash
# Builds every Lambda function with cargo-lambda (release profile: LTO, stripped).
# usage: build-functions.sh [--arm64] [-p EXTRA_PACKAGE...]   (x86_64 by default; --arm64 for the
# template's architecture; extra packages, e.g. the benchmark's hello-world baseline, are built alongside)
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/scripts/local-aws.sh
venv=$(local_aws_venv lambda cargo-lambda)
export PATH="$venv/bin:$PATH"
arch=(--x86-64)
dir=target/lambda/x86_64
if [ "${1:-}" = "--arm64" ]; then arch=(--arm64); dir=target/lambda/arm64; shift; fi
packages=("$@")
for f in functions/*/; do packages+=(-p "$(basename "$f")"); done
cargo lambda build --release --locked "${arch[@]}" --lambda-dir "$dir" "${packages[@]}"
for f in functions/*/; do
  name=$(basename "$f")
  test -s "$dir/$name/bootstrap" || { echo "missing $dir/$name/bootstrap" >&2; exit 1; }
  printf '%-28s %8d bytes\n' "$name" "$(stat -c %s "$dir/$name/bootstrap")"
done
