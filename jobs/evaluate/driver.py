"""`lidit evaluate`: the prompt-following benchmark, the positional-bias probe and public-benchmark image
grids for a checkpoint folder or a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

Results go to an MLflow run (metrics, `benchmark.json` table, image grids, probe table) and, for a
registered version, onto the version as `lidit.eval.*` tags (the promotion gate reads them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lidit.jobs.evaluate.spec import METRICS, EvaluateSpec
from lidit.platform.config import LiditError

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    scores: dict[str, float]
    benchmark: str
    rows: list[dict]
    probe: list[dict] = field(default_factory=list)
    likelihood_rows: list[dict] = field(default_factory=list)
    version: str | None = None
    run_id: str | None = None
    output: str | None = None


def evaluate(spec: EvaluateSpec) -> EvaluationResult:
    """Run the benchmark (+ probe, + public grids) and record the results in MLflow."""
    from lidit.jobs.evaluate.benchmark import captioned_grid, run_benchmark, write_public
    from lidit.jobs.evaluate.probe import caption_pairs, format_rows, positional_bias
    from lidit.models.generate import TextToImagePipeline
    from lidit.pipelines.shapes import encode_png
    from lidit.platform import registry, storage, tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir) if spec.log_to_mlflow else spec.tracking.tracking_uri
    resolved = registry.resolve(spec.model, uri)
    try:
        pipeline = TextToImagePipeline.from_checkpoint(resolved.folder, spec.device, spec.encoder_paths or None)
    except (ValueError, FileNotFoundError) as err:
        raise LiditError(f"model {spec.model}: {err}") from None
    key = spec.benchmark.key()
    scores, rows, images = run_benchmark(pipeline, spec.benchmark)
    likelihood_rows = []
    if spec.benchmark.likelihood.enabled:
        from lidit.jobs.evaluate.likelihood import likelihood_score

        likelihood, likelihood_rows = likelihood_score(pipeline, spec.benchmark)
        scores.update(likelihood)
    probe_rows = []
    if spec.probe.enabled:
        probe_rows = positional_bias(pipeline.encoders, pipeline.model, caption_pairs(spec.probe.pairs),
                                     spec.probe.timestep)
    version = resolved.version
    label = f"{version.name}-v{version.version}" if version else Path(resolved.folder).name
    result = EvaluationResult(scores, key, rows, probe_rows, likelihood_rows, version.version if version else None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "benchmark.json").write_text(json.dumps({"benchmark": key, "scores": scores, "rows": rows}, indent=1))
        flat = images.reshape(-1, *images.shape[2:])  # prompt-major, as the rows
        (out / "benchmark_grid.png").write_bytes(encode_png(captioned_grid(
            flat, [r["prompt"] for r in rows], [r["all"] for r in rows])))
        (out / "probe.json").write_text(json.dumps(probe_rows, indent=1))
        (out / "likelihood.json").write_text(json.dumps(likelihood_rows, indent=1))
        for public in spec.public:
            count = write_public(pipeline, public, spec.benchmark, out / "public" / public.name, spec.storage)
            log.info("public %s: %d prompts written", public.name, count)
        result.output = storage.join(spec.output, label, key)
        storage.upload_dir(str(out), result.output, spec.storage)
        if spec.log_to_mlflow:
            run_id, _ = tracking.start_run(uri, spec.tracking.experiment, f"evaluate {label} {key}",
                                           tags={"lidit.job": "evaluate", "lidit.model": spec.model,
                                                 "lidit.benchmark": key, "lidit.model_version": label})
            tracking.log_spec(uri, run_id, spec)
            tracking.log_metrics(uri, run_id, {f"benchmark.{k}": v for k, v in scores.items()}, step=0)
            tracking.log_metrics(uri, run_id, {f"probe.{r['encoder']}.{k}": r[k] for r in probe_rows
                                               for k in ("raw", "refined", "fused") if k in r}, step=0)
            tracking.client(uri).log_table(run_id, {k: [r.get(k) for r in rows] for k in rows[0]}, "benchmark_table.json")
            tracking.log_artifact(uri, run_id, str(out))
            tracking.end_run(uri, run_id)
            result.run_id = run_id
            if version is not None:
                registry.record_evaluation(uri, version.name, version.version, key, scores, run_id)
    print(format_scores(scores, key, label))
    if probe_rows:
        print(format_rows(probe_rows))
    return result


def format_scores(scores: dict[str, float], key: str, label: str) -> str:
    lines = [f"benchmark {key} for {label}"]
    for title, prefix in (("sampled", ""), ("likelihood", "likelihood.")):  # the checker's, the likelihood's
        names = [k for k in METRICS if k in scores and k.startswith("likelihood.") == bool(prefix)]
        if names:
            lines += ["  ".join(f"{n:>11}" for n in (title, *[n.removeprefix(prefix) for n in names])),
                      "  ".join(f"{v:>11}" for v in ("", *[f"{scores[n]:.3f}" for n in names]))]
    return "\n".join(lines)


def untrained_checkpoint(trained: str, folder: str, seed: int = 0, **model_changes) -> str:
    """The benchmark's floor: a checkpoint of the same architecture (with `model_changes` to its LiDiTConfig),
    encoders and codec as the local checkpoint folder `trained`, freshly initialised (what training starts
    from), written to `folder`."""
    import torch

    from lidit.models import LiDiT, read_checkpoint_info, save_checkpoint

    info = read_checkpoint_info(trained)
    torch.manual_seed(seed)
    model = LiDiT(dataclasses.replace(info.model, **model_changes))
    save_checkpoint(folder, model, model, dataclasses.replace(info, dataset=None))
    return folder
