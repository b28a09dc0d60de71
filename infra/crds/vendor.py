"""Regenerate the vendored KubeRay CRD schemas from a KubeRay checkout (needs no network itself).

    git clone --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/crds/vendor.py /tmp/kuberay v1.7.0

For each CRD this project uses, it takes the `ray.io/v1` version's `openAPIV3Schema` from
helm-chart/kuberay-operator/crds/ray.io_<plural>.yaml, drops the `description` texts (they are most of the
size and no part of validation) and writes it as compact JSON beside this script, with SOURCE.md naming the
release, commit and paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

PLURALS = ("rayclusters", "rayjobs", "rayservices")
HERE = Path(__file__).parent


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(checkout: str, tag: str) -> None:
    repo = Path(checkout)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{tag}^{{commit}}"], capture_output=True,
                            text=True, check=True).stdout.strip()
    rows = []
    for plural in PLURALS:
        path = f"helm-chart/kuberay-operator/crds/ray.io_{plural}.yaml"
        text = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], capture_output=True, text=True,
                              check=True).stdout
        crd = yaml.safe_load(text)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        out = HERE / f"ray.io_{plural}.v1.schema.json"
        out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        rows.append(f"| `{out.name}` | `{path}` | {crd['spec']['names']['kind']} |")
    (HERE / "SOURCE.md").write_text(
        "# Vendored KubeRay CRD schemas\n\n"
        f"Source: https://github.com/ray-project/kuberay, release `{tag}` (commit `{commit}`), Apache-2.0.\n"
        "Each file is the `openAPIV3Schema` of the CRD's `ray.io/v1` version with the `description` texts\n"
        "removed; nothing else is changed. Regenerate with `python infra/crds/vendor.py KUBERAY_CHECKOUT TAG`.\n\n"
        "| file | path in the KubeRay repository | kind |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
