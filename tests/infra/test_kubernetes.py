"""infra/kubernetes/: the manifests parse, match the KubeRay CRD schemas vendored in infra/crds/ (closed as
`kubectl apply`'s strict field validation closes them), reference only objects and keys that exist, and
name entrypoints, specs and import paths that the lidit code accepts."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CRDS = {"RayCluster": "ray.io_rayclusters.v1.schema.json", "RayJob": "ray.io_rayjobs.v1.schema.json",
        "RayService": "ray.io_rayservices.v1.schema.json"}
CORE = {"ConfigMap": "v1", "Secret": "v1", "Service": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1"}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LIDIT_IMAGE = "lidit:0.1.0"


def load_manifests() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "kubernetes").glob("*.yaml")):
        docs += [dict(doc, _file=path.name) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def closed(schema):
    """The schema with objects that declare properties rejecting unknown fields, as the API server does under
    `kubectl apply`'s strict field validation; x-kubernetes-preserve-unknown-fields objects stay open."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "required", "default") else closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


MANIFESTS = load_manifests()
SCHEMAS = {kind: closed(json.loads((INFRA / "crds" / name).read_text())) for kind, name in CRDS.items()}
_CLUSTER = SCHEMAS["RayCluster"]["properties"]["spec"]["properties"]
_POD_TEMPLATE = _CLUSTER["headGroupSpec"]["properties"]["template"]
SERVICE = _CLUSTER["headGroupSpec"]["properties"]["headService"]  # KubeRay embeds core/v1 Service
PVC_SPEC = (_POD_TEMPLATE["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]["ephemeral"]
            ["properties"]["volumeClaimTemplate"]["properties"]["spec"])
LABEL_SELECTOR = (_POD_TEMPLATE["properties"]["spec"]["properties"]["affinity"]["properties"]["podAffinity"]
                  ["properties"]["requiredDuringSchedulingIgnoredDuringExecution"]["items"]["properties"]
                  ["labelSelector"])


def errors(schema: dict, value) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}" for e in validator.iter_errors(value)]


def doc_errors(doc: dict) -> list[str]:
    """Everything `kubectl apply` would refuse in one document, as far as the schemas here know."""
    doc = {k: v for k, v in doc.items() if k != "_file"}
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    problems = [] if DNS_LABEL.match(str(meta.get("name", ""))) else [f"metadata.name {meta.get('name')!r}"]
    problems += [f"label {k}={v!r} is not a string" for k, v in (meta.get("labels") or {}).items()
                 if not isinstance(v, str)]
    if kind in CRDS:
        if doc.get("apiVersion") != "ray.io/v1":
            return problems + [f"apiVersion {doc.get('apiVersion')} (the vendored CRDs serve ray.io/v1)"]
        return problems + errors(SCHEMAS[kind], doc)
    if CORE.get(kind) != doc.get("apiVersion"):
        return problems + [f"unknown kind/apiVersion {kind} {doc.get('apiVersion')}"]
    spec = doc.get("spec") or {}
    if kind in ("ConfigMap", "Secret"):
        allowed = {"apiVersion", "kind", "metadata", "data", "stringData", "type", "immutable"}
        values = {**(doc.get("data") or {}), **(doc.get("stringData") or {})}
        problems += [f"unknown field {k}" for k in doc if k not in allowed]
        problems += [f"key {k!r}" for k in values if not re.fullmatch(r"[-._a-zA-Z0-9]+", k)]
        problems += [f"value of {k} is not a string" for k, v in values.items() if not isinstance(v, str)]
    elif kind == "Service":
        problems += errors(SERVICE, doc)
    else:
        allowed = {"Deployment": {"replicas", "selector", "template", "strategy", "minReadySeconds",
                                  "revisionHistoryLimit", "progressDeadlineSeconds", "paused"},
                   "StatefulSet": {"replicas", "selector", "template", "serviceName", "volumeClaimTemplates",
                                   "podManagementPolicy", "updateStrategy", "revisionHistoryLimit",
                                   "minReadySeconds", "persistentVolumeClaimRetentionPolicy", "ordinals"}}[kind]
        problems += [f"spec.{k}: unknown field" for k in spec if k not in allowed]
        problems += [f"spec.{k}: required" for k in ("selector", "template") if k not in spec]
        problems += errors(LABEL_SELECTOR, spec.get("selector", {})) + errors(_POD_TEMPLATE, spec.get("template", {}))
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        if not (spec.get("selector", {}).get("matchLabels", {}).items() <= labels.items()):
            problems.append("spec.selector.matchLabels do not select spec.template's labels")
        for claim in spec.get("volumeClaimTemplates", []):
            problems += errors(PVC_SPEC, claim.get("spec", {}))
    return problems


def test_every_document_is_known_and_valid():
    kinds = sorted({doc["kind"] for doc in MANIFESTS})
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "StatefulSet", "Service", "ConfigMap",
            "Secret"} <= set(kinds)
    report = {f"{doc['_file']}: {doc['kind']}/{doc['metadata']['name']}": doc_errors(doc) for doc in MANIFESTS}
    assert {k: v for k, v in report.items() if v} == {}


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(minReplica=0), "minReplica"),  # misspelt field
    (lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"), "is not of type 'integer'"),
    (lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required"),
    (lambda c: c["spec"]["authOptions"].update(mode="password"), "password"),
    (lambda c: c.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
])
def test_the_validation_catches_mistakes(mutate, expected):
    cluster = copy.deepcopy(next(d for d in MANIFESTS if d["kind"] == "RayCluster"))
    mutate(cluster)
    assert any(expected in problem for problem in doc_errors(cluster)), doc_errors(cluster)


def test_core_object_checks_catch_mistakes():
    deployment = copy.deepcopy(next(d for d in MANIFESTS if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["nam"] = "x"
    deployment["spec"]["selector"]["matchLabels"] = {"app": "other"}
    problems = doc_errors(deployment)
    assert any("nam" in p for p in problems) and any("do not select" in p for p in problems)


# --- references between the documents -------------------------------------------------------------------

def containers(doc: dict) -> list[dict]:
    """Every container of a document, whatever the kind (pod templates anywhere in it)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(doc)
    return found


def defined() -> dict[tuple[str, str], set[str]]:
    return {(d["kind"], d["metadata"]["name"]): set(d.get("data") or {}) | set(d.get("stringData") or {})
            for d in MANIFESTS if d["kind"] in ("ConfigMap", "Secret")}


def test_referenced_configmaps_secrets_and_keys_exist():
    objects, missing = defined(), []
    for doc in MANIFESTS:
        for container in containers(doc):
            for source in container.get("envFrom", []):
                for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    ref = source.get(field)
                    if ref and not ref.get("optional") and (kind, ref["name"]) not in objects:
                        missing.append(f"{doc['_file']}: {kind} {ref['name']}")
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in objects.get(("Secret", ref["name"]), set()):
                    missing.append(f"{doc['_file']}: Secret {ref['name']} key {ref['key']}")
        for spec in _ray_cluster_specs(doc):
            auth = spec.get("authOptions", {})
            if auth.get("mode") == "token" and ("Secret", auth["secretName"]) not in objects:
                missing.append(f"{doc['_file']}: token Secret {auth['secretName']}")
            if "auth_token" not in objects.get(("Secret", auth.get("secretName")), {"auth_token"}):
                missing.append(f"{doc['_file']}: Secret {auth['secretName']} has no auth_token key")
    assert missing == []


def test_variable_references_in_args_are_defined():
    objects = defined()
    for doc in MANIFESTS:
        for container in containers(doc):
            names = {env["name"] for env in container.get("env", [])}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                names |= objects.get(("ConfigMap" if "configMapRef" in source else "Secret", ref["name"]), set())
            used = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(container.get("args", []))))
            assert used <= names, (doc["_file"], used - names)


def test_services_select_pods_and_name_their_ports():
    workloads = [d for d in MANIFESTS if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in MANIFESTS if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        targets = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in containers(targets[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    statefulset = next(d for d in MANIFESTS if d["kind"] == "StatefulSet")
    assert ("Service", statefulset["spec"]["serviceName"]) in {(d["kind"], d["metadata"]["name"]) for d in MANIFESTS}


# --- Ray clusters: versions, images, scaling ------------------------------------------------------------

def _ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")] if "rayClusterSpec" in spec else [],
            "RayService": [spec.get("rayClusterConfig")]}.get(doc["kind"], [])


def test_ray_clusters_run_this_ray_and_the_lidit_image():
    project = yaml.safe_load((REPO / "pyproject.toml").read_text().split("[project]")[1].split("[")[0]
                             .replace(" = ", ": "))
    assert LIDIT_IMAGE == f"lidit:{project['version']}"
    clusters = [spec for doc in MANIFESTS for spec in _ray_cluster_specs(doc)]
    assert len(clusters) == 3
    for spec in clusters:
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"] == {"mode": "token", "secretName": "lidit-ray-token"}
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in containers(g))
    images = {c["image"] for doc in MANIFESTS for c in containers(doc) if "postgres" not in c["image"]}
    assert images == {LIDIT_IMAGE}


def test_the_shared_cluster_autoscales_a_gpu_group():
    cluster = next(d for d in MANIFESTS if d["kind"] == "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in containers(g)[0]["resources"]["limits"]]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] < gpu[0]["maxReplicas"]
    head = containers(cluster["headGroupSpec"])[0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


# --- entrypoints, specs and the serve application --------------------------------------------------------

def _job_specs() -> dict[str, str]:
    return next(d for d in MANIFESTS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lidit-job-specs")["data"]


def _head_of(job: dict) -> dict:
    """The head group of the cluster a RayJob runs on (its own, or the RayCluster its selector names)."""
    spec = job["spec"]
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]["headGroupSpec"]
    name = spec["clusterSelector"]["ray.io/cluster"]
    return next(d for d in MANIFESTS if d["kind"] == "RayCluster" and d["metadata"]["name"] == name)["spec"]["headGroupSpec"]


@pytest.mark.parametrize("job_name", ["lidit-precompute", "lidit-train"])
def test_rayjob_entrypoints_are_lidit_commands_on_valid_specs(job_name):
    from lidit.jobs.cli import build_parser
    from lidit.jobs.commands import COMMANDS, spec_class
    from lidit.platform.config import parse_spec

    job = next(d for d in MANIFESTS if d["kind"] == "RayJob" and d["metadata"]["name"] == job_name)
    program, command, *rest = shlex.split(job["spec"]["entrypoint"])
    assert program == "lidit" and command in COMMANDS and command in job_name
    args = build_parser(command)[0].parse_args(rest)  # argparse exits on arguments the command does not take
    head = _head_of(job)
    pod = head["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    folder, file = str(Path(args.spec).parent), Path(args.spec).name
    assert volumes[mounts[folder]]["configMap"]["name"] == "lidit-job-specs"
    spec = parse_spec(spec_class(command), yaml.safe_load(_job_specs()[file]), f"job-specs.yaml:{file}")
    if command == "train":  # the training workers fit in the job's own cluster
        gpus = sum(g["maxReplicas"] * int(containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert spec.scaling.use_gpu and spec.scaling.num_workers * max(spec.scaling.gpus_per_worker, 1) <= gpus


def test_train_spec_reads_what_precompute_writes():
    specs = {name: yaml.safe_load(text) for name, text in _job_specs().items()}
    assert specs["train.yaml"]["data"]["embeddings"] == specs["precompute.yaml"]["output"]
    fields = ("name", "path", "dtype", "max_tokens", "layer", "instruction")
    assert ([{k: e.get(k) for k in fields} for e in specs["train.yaml"]["encoders"]]
            == [{k: e.get(k) for k in fields} for e in specs["precompute.yaml"]["encoders"]])


def test_rayservice_imports_a_serve_application_builder_with_valid_args():
    from lidit.jobs.serve.spec import ServeSpec
    from lidit.platform.config import parse_spec

    service = next(d for d in MANIFESTS if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attribute, None)
    assert callable(builder), f"{app['import_path']} is not a Ray Serve application builder"
    spec = parse_spec(ServeSpec, app["args"], "rayservice.yaml args")
    assert spec.model.endswith("@champion") and spec.tracking.tracking_uri == "http://lidit-mlflow:5000"


# --- the MLflow server -------------------------------------------------------------------------------------

def _mlflow_container() -> dict:
    deployment = next(d for d in MANIFESTS if d["kind"] == "Deployment" and d["metadata"]["name"] == "lidit-mlflow")
    return containers(deployment)[0]


def test_mlflow_server_arguments_are_mlflow_server_options():
    from mlflow.cli import server

    container = _mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    env = {e["name"]: "x" for e in container["env"]} | {k: "s3://bucket/artifacts" for k in defined()[("ConfigMap", "lidit-env")]}
    args = [re.sub(r"\$\(([A-Za-z_0-9]+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    context = server.make_context("mlflow server", args)  # click refuses options mlflow server does not have
    assert context.params["backend_store_uri"].startswith("postgresql://")
    assert context.params["artifacts_destination"].startswith("s3://")
    assert context.params["host"] == "0.0.0.0"


def test_mlflow_server_accepts_in_cluster_host_headers_only():
    from mlflow.server.security_utils import is_allowed_host_header

    value = next(e["value"] for e in _mlflow_container()["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    hosts = [h.strip() for h in value.split(",")]
    uri = next(d for d in MANIFESTS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lidit-env")["data"]["MLFLOW_TRACKING_URI"]
    for host in (uri.split("://")[1], "lidit-mlflow.lidit.svc.cluster.local:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "attacker.example.com")
