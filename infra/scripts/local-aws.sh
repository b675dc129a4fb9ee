#!/usr/bin/env bash
# Local AWS for tests: moto server (SQS, DynamoDB, Secrets Manager) on 127.0.0.1.
# Source it, then call `local_aws_start` (exports AWS_ENDPOINT_URL and test credentials; the
# server stops when the calling shell exits) or run it directly to keep one in the foreground.
# Tools live in virtual environments under .local-aws/ (never system-wide).

LOCAL_AWS_DIR="${LOCAL_AWS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.local-aws}"
MOTO_VERSION="5.2.5"

# venv NAME PACKAGES...: creates .local-aws/NAME with the packages, once.
local_aws_venv() {
  local name="$1"; shift
  local dir="$LOCAL_AWS_DIR/$name"
  local stamp="$dir/.installed-$(echo "$*" | cksum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check "$@"
    touch "$stamp"
  fi
  echo "$dir"
}

local_aws_start() {
  local venv
  venv=$(local_aws_venv moto "moto[sqs,dynamodb,secretsmanager]==$MOTO_VERSION" flask flask-cors)
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # moto_serve.py: moto_server with DynamoDB requests isolated from each other, as in DynamoDB.
  "$venv/bin/python" "$(dirname "${BASH_SOURCE[0]}")/moto_serve.py" -H 127.0.0.1 -p "$port" >"$LOCAL_AWS_DIR/moto.log" 2>&1 &
  MOTO_PID=$!
  trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
      export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
      export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
      export AWS_EC2_METADATA_DISABLED=true
      echo "moto server on $AWS_ENDPOINT_URL (pid $MOTO_PID)" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "moto server did not start; see $LOCAL_AWS_DIR/moto.log" >&2
  return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  mkdir -p "$LOCAL_AWS_DIR"
  local_aws_start
  echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true"
  wait "$MOTO_PID"
fi
