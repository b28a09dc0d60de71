"""The package layout of ../shared/design.md: four folders mapped into `lidit.*`, stdlib `platform` intact."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    code = "import platform, sysconfig; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    system, path = out.stdout.split()
    assert system == "Linux"
    assert Path(path).parent == Path(subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"], capture_output=True, text=True).stdout.strip())
    assert not (REPO / "platform" / "__init__.py").exists()


def test_namespace_maps_the_four_folders():
    import lidit.jobs
    import lidit.models
    import lidit.pipelines
    import lidit.platform.config

    assert Path(lidit.platform.config.__file__).parent == REPO / "platform"
    for module, folder in ((lidit.models, "models"), (lidit.pipelines, "pipelines"), (lidit.jobs, "jobs")):
        assert Path(module.__file__).parent == REPO / folder
