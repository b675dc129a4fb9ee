"""Transforms template.yaml to plain CloudFormation with the SAM translator, so cfn-lint can
check what SAM generates (it checks AWS::Serverless::* resources only loosely).

usage: python sam_transform.py template.yaml out.json
"""
import json
import os
import sys

from cfnlint.decode import decode
from samtranslator.translator.transform import transform


class NoManagedPolicies:
    """The template names no AWS managed policies by name; nothing to look up offline."""

    def load(self):
        return {}


def main(src, dest):
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    template, errors = decode(src)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        sys.exit(1)
    for resource in template.get("Resources", {}).values():
        if resource.get("Type") == "AWS::Serverless::Function":
            # Packaging replaces the local CodeUri with an S3 location.
            resource.setdefault("Properties", {})["CodeUri"] = "s3://relink-artifacts-placeholder/function.zip"
    globals_function = template.get("Globals", {}).get("Function", {})
    globals_function.pop("CodeUri", None)
    out = transform(template, {}, NoManagedPolicies())
    with open(dest, "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
