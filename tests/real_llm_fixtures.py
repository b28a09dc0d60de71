"""Session fixture `real_llms`: {"smollm2": folder, "gemma3": folder} of the two real LLMs imported
from their PyPI GGUF packages into plain HF folders.

The folders live under `$LIDIT_CACHE/models` (default ~/.cache/lidit/models), the same place the
`real` encoder preset uses, so only the first test session ever pays for the import (~20 s + ~60 s
on 2 cores); later sessions find them complete and reuse them.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_llms() -> dict[str, str]:
    from lidit.jobs.precompute.presets import default_models_dir
    from lidit.models.gguf import import_bundled

    return import_bundled(default_models_dir())
