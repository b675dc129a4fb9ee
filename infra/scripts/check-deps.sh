#!/usr/bin/env bash
# Keeps the crates' dependency direction (docs/architecture.md, "Crate map"): the Lambda
# functions link no SQLite, CLI or simulator crates and no crash-drill failpoints, and the core
# links no HTTP client, AWS SDK, SQLite or Lambda runtime. Fails naming what crept back.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail=0
# deps PACKAGE: the package's normal (non-dev, non-build) dependency names, one per line.
tree() {
  local out
  out=$(cargo tree --locked "$@") || { echo "check-deps: cargo tree $* failed" >&2; exit 2; }
  printf '%s\n' "$out"
}
deps() { tree -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u; }
forbid() {
  local pkg=$1 pattern=$2 all found
  all=$(deps "$pkg")
  found=$(grep -E "^($pattern)$" <<<"$all" || true)
  if [[ -n $found ]]; then
    echo "check-deps: $pkg depends on $(echo "$found" | tr '\n' ' ')" >&2
    fail=1
  fi
}

functions=(detect-mismatch purge-keys clear-dataverse-configs reset-link ingest-notification watch-restores)
for f in "${functions[@]}"; do
  forbid "$f" 'rusqlite|libsqlite3-sys|clap|indicatif|axum|relink-embedded|relink-sim'
  if tree -p "$f" -e features -i relink-core --prefix none | grep -q 'feature "failpoints"'; then
    echo "check-deps: $f is built with relink-core's failpoints" >&2
    fail=1
  fi
done
forbid relink-core 'reqwest|hyper|aws-sdk-.*|aws-config|rusqlite|libsqlite3-sys|lambda_runtime|aws_lambda_events|axum|relink-(dynamics|aws|embedded|sim)'
forbid relink-dynamics 'aws-sdk-.*|rusqlite|lambda_runtime|relink-aws|relink-embedded'
forbid relink-embedded 'reqwest|aws-sdk-.*|lambda_runtime|relink-aws|relink-dynamics'

if [[ $fail == 0 ]]; then echo "check-deps: dependency direction holds"; fi
exit $fail
