"""The layering of ../shared/design.md as import-linter contracts (pyproject.toml, [tool.importlinter]):
jobs > pipelines > models, platform under everything and importing no other folder, models free of Ray,
MLflow and remote storage, no import circles, worker-side code apart from the drivers that launch it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = [str(Path(sys.executable).parent / "lint-imports"), str(REPO / "pyproject.toml"), "--no-cache"]


def lint() -> subprocess.CompletedProcess:
    return subprocess.run(LINT, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_import_contracts_are_kept():
    done = lint()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("probes, broken", [
    ({"models/_probe.py": "import ray\n"}, "models/ is pure PyTorch"),
    ({"platform/_probe.py": "import lidit.jobs.cli\n"}, "platform/ imports no other folder"),
    ({"pipelines/_probe.py": "import lidit.jobs.commands\n"}, "layers: jobs > pipelines > models"),
    ({"jobs/_probe_a.py": "import lidit.jobs._probe_b\n", "jobs/_probe_b.py": "import lidit.jobs._probe_a\n"},
     "no import circles"),
])
def test_each_contract_catches_its_violation(probes, broken):
    """Modules that break a contract, dropped into the tree for the length of one lint run."""
    paths = [REPO / name for name in probes]
    for path, source in zip(paths, probes.values()):
        path.write_text(source)
    try:
        done = lint()
    finally:
        for path in paths:
            path.unlink()
    # the contract's name (wrapped over two lines at most) and its verdict
    assert done.returncode != 0 and re.search(re.escape(broken) + r"[^\n]*\n?[^\n]*BROKEN", done.stdout), done.stdout[-3000:]


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for folder in ("platform", "models", "pipelines", "jobs")
            for p in (REPO / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_jobs_root_holds_only_the_cli_wiring():
    assert sorted(p.name for p in (REPO / "jobs").glob("*.py")) == ["__init__.py", "cli.py", "commands.py"]
