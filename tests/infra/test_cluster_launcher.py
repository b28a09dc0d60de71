"""infra/cluster-launcher/aws.yaml against Ray's own schema (ray/autoscaler/ray-schema.json) and the checks
`ray up` runs before it launches anything."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((REPO / "infra" / "cluster-launcher" / "aws.yaml").read_text())
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_validates_against_rays_schema_as_written_and_as_ray_up_prepares_it():
    jsonschema.validate(CONFIG, SCHEMA)
    prepared = prepare_config(copy.deepcopy(CONFIG))  # merges the AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(idle_timeout_minute=5),  # misspelt top-level field
    lambda c: c["provider"].pop("type"),
    lambda c: c.update(max_workers="twelve"),
])
def test_rays_schema_catches_mistakes(mutate):
    config = copy.deepcopy(CONFIG)
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)


def test_cpu_head_autoscaled_gpu_workers_and_token_auth():
    nodes = CONFIG["available_node_types"]
    assert nodes[CONFIG["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu"]["min_workers"] == 0 < nodes["gpu"]["max_workers"] <= CONFIG["max_workers"]
    assert nodes["gpu"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "--env RAY_AUTH_MODE=token" in CONFIG["docker"]["run_options"]
    assert CONFIG["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert all("--dashboard-host=0.0.0.0" in cmd for cmd in CONFIG["head_start_ray_commands"][1:])
