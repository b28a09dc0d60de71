"""infra/Dockerfile, checked without a Docker engine: the Ray it pins is the Ray the package requires, it
installs CUDA torch at the tested version, the project with its extras, and what the MLflow server needs."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import ray
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def args() -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in instructions() if op == "ARG" and "=" in arg)


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def pip_install() -> list[str]:
    (command,) = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    words = shlex.split(command.split("&&")[0])
    values = args()
    return [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], w) for w in words]


def test_base_image_is_the_gpu_ray_image_of_the_pinned_version():
    ((op, base),) = [(op, arg) for op, arg in instructions() if op == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args()[m.group(1)], base)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{ray.__version__}-{python}-gpu"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_requirement = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray"))
    assert ray_requirement.specifier.contains(args()["RAY_VERSION"]) and pins()["ray"] == args()["RAY_VERSION"]


def test_installs_cuda_torch_the_project_and_the_postgres_driver():
    words = pip_install()
    assert words[:3] == ["pip", "install", "--no-cache-dir"] and "-c" in words
    assert words[words.index("-c") + 1] == "constraints.txt"
    assert f"torch=={pins()['torch']}" in words
    assert not any("download.pytorch.org" in w or "/cpu" in w or "--index-url" in w for w in words)
    assert f"ray[data,train,serve,default]=={ray.__version__}" in words
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    project = next(w for w in words if w.startswith(".["))
    assert set(project[2:-1].split(",")) <= set(extras)
    assert any(w.startswith("psycopg2-binary==") for w in words)  # mlflow.yaml: postgresql:// backend store


def test_copies_the_four_code_folders_and_what_the_build_needs():
    copied = [shlex.split(arg) for op, arg in instructions() if op == "COPY"]
    sources = {s.rstrip("/") for words in copied for s in words[:-1] if not s.startswith("--")}
    assert {"platform", "models", "pipelines", "jobs", "pyproject.toml", "README.md", "constraints.txt"} <= sources
    assert all((REPO / s).exists() for s in sources)
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dir.values()) <= sources
    ignored = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and not set(ignored) & {"platform", "models", "pipelines", "jobs"}


def test_manifests_use_the_image_this_dockerfile_documents():
    tag = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", DOCKERFILE.read_text()).group(1)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tag == f"lidit:{version}"
    for path in (REPO / "infra" / "kubernetes").glob("*.yaml"):
        images = set(re.findall(r"image: (\S+)", path.read_text())) - {"postgres:17"}
        assert images <= {tag}, path.name
    launcher = yaml.safe_load((REPO / "infra" / "cluster-launcher" / "aws.yaml").read_text())
    assert launcher["docker"]["image"].endswith(f"/{tag}")
