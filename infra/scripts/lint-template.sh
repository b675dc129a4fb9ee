#!/usr/bin/env bash
# Lints template.yaml twice: with the serverless rules, and after the SAM transform (cfn-lint
# checks AWS::Serverless::* resources only loosely; the transformed template is plain
# CloudFormation, where a wrong Runtime, property or !GetAtt is caught).
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/scripts/local-aws.sh
venv=$(local_aws_venv lint cfn-lint cfn-lint-serverless aws-sam-translator)
"$venv/bin/cfn-lint" template.yaml -a cfn_lint_serverless.rules
out=$(mktemp --suffix=.json)
trap 'rm -f "$out"' EXIT
"$venv/bin/python" infra/scripts/sam_transform.py template.yaml "$out"
"$venv/bin/cfn-lint" "$out"
echo "template.yaml: cfn-lint clean (serverless rules, and after the SAM transform)"
