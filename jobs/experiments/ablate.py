"""`lidit ablate [SPEC.yaml]`: the paper's encoder ablation (LI-DiT Sec. 4.3, Table 4) on one data set and budget.

Variants, each a step up the paper's ladder (one change per step):

- `raw`: the frozen LLM's hidden states of the caption alone (no instruction, no chat template), straight
  into the backbone (no linguistic token refiner: `use_refiner=False`, only the input projection);
- `instruction`: + the paper's instruction (inside the chat template for an instruction-tuned LLM, a
  plain prefix for a base one), still no refiner;
- `refiner`: + the bidirectional, gated linguistic token refiner (Sec. 3.2);
- `concat`: every LLM, each through its refiner, plainly concatenated (`use_collaborative=False`);
- `collaborative`: every LLM fused by the collaborative refiner (Sec. 3.3).

Variants named in `per_llm` run once per LLM (instruction-tuned vs base), the others over all LLMs at
once; every one runs for each training seed. All go through the same jobs as a user's run:
`precompute` (once per distinct encoder set: the output is fingerprinted by the encoder specs),
`train` and `evaluate` (held-out shapes benchmark + positional-bias probe). One table (mean +- half the
range over seeds) is printed and logged, with per-seed values, in the MLflow run `<name>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lidit.jobs.evaluate import BenchmarkSpec, ProbeSpec
from lidit.jobs.train import ScheduleKind
from lidit.platform.config import EncoderSpec, RaySpec, Spec, StorageSpec, TrackingSpec, load_spec

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ablate.yaml"
Kind = Literal["raw", "instruction", "refiner", "concat", "collaborative"]
LABELS = {"raw": "raw LLM", "instruction": "+ instruction", "refiner": "+ token refiner",
          "concat": "+ both LLMs, concat", "collaborative": "+ collaborative refiner", "floor": "untrained floor"}
# what each kind changes in the encoder specs and in LiDiTConfig
MODEL_FLAGS = {"raw": (False, False), "instruction": (False, False), "refiner": (True, False),
               "concat": (True, False), "collaborative": (True, True)}  # (use_refiner, use_collaborative)
CATEGORIES = ("color", "shape", "count", "spatial", "overall", "all_correct")


class AblateDataSpec(Spec):
    """The synthetic shapes data every variant trains on (written once under the workdir)."""

    train: int = Field(2000, gt=0, description="training images")
    image_size: int = Field(32, ge=8)
    shard_size: int = Field(250, gt=0)
    seed: int = 0
    heldout_percent: int = Field(10, gt=0, lt=100)


class BudgetSpec(Spec):
    """The training budget, the same for every variant."""

    preset: Literal["tiny", "mini", "small", "1b", "10b"] = "tiny"
    overrides: dict = Field(default_factory=dict, description="LiDiTConfig fields (not use_refiner/use_collaborative)")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(30, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    schedule: ScheduleKind = Field(
        "cosine", description="DDPM noise schedule; cosine: 32 px pixel-space images learn their captions reliably")
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)

    @field_validator("overrides")
    @classmethod
    def _flags_are_the_variants(cls, overrides: dict) -> dict:
        for key in ("use_refiner", "use_collaborative"):
            if key in overrides:
                raise ValueError(f"{key} is what the variants change; leave it out")
        return overrides


class PrecomputeResourcesSpec(Spec):
    """Ray resources of the precompute stages. The LLMs of one encoder set run at once, so their CPUs add
    up: two 1-CPU actors plus the codec stage do not fit a 2-CPU machine (Ray Data then waits forever)."""

    encoder_num_cpus: float | None = Field(0.5, gt=0, description="per LLM actor; None: the encoder specs' own")
    stage_num_cpus: float = Field(0.25, gt=0, description="read, codec and write stages each")


class AblateSpec(Spec):
    name: str = Field("ablation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow run name")
    workdir: str = Field(".lidit/ablate", description="data, embeddings, checkpoints, evaluations, sqlite MLflow")
    encoders: str | list = Field("real", description="preset (real, tiny) or list, as lidit.jobs.encoders")
    models_dir: str | None = Field(None, description="where preset LLMs are built/imported; None: $LIDIT_CACHE/models")
    raw_layer: int | None = Field(None, description="layer of the raw rows; None: each encoder's own (default -3)")
    variants: list[Kind] = Field(["raw", "instruction", "refiner", "collaborative"], min_length=1)
    per_llm: list[Kind] = Field(["raw", "instruction", "refiner"], description="variants run once per LLM")
    seeds: list[int] = Field([0, 1], min_length=1, description="training seeds; >= 2 to see the spread")
    data: AblateDataSpec = Field(default_factory=AblateDataSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    precompute: PrecomputeResourcesSpec = Field(default_factory=PrecomputeResourcesSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    floor: bool = Field(True, description="also evaluate the untrained full model (the benchmark's floor)")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _consistent(self) -> "AblateSpec":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: each seed once")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants: each variant once")
        if self.benchmark.data_seed != self.data.seed or self.benchmark.heldout_percent != self.data.heldout_percent:
            raise ValueError("benchmark.data_seed/heldout_percent: must equal data.seed/heldout_percent "
                             "(the held-out prompts are those the training data leaves out)")
        return self


@dataclass
class Variant:
    kind: str
    encoders: list[EncoderSpec]

    @property
    def llms(self) -> str:
        return "+".join(e.name for e in self.encoders)

    @property
    def id(self) -> str:
        """`collaborative-smollm2-gemma3`: fits run names, folders and MLflow metric names (names have no '-')."""
        return "-".join([self.kind, *(e.name for e in self.encoders)])


@dataclass
class Outcome:
    """One variant over its seeds: benchmark scores and probe rows per seed, and where they came from."""

    variant: str
    kind: str
    llms: str
    scores: list[dict[str, float]] = field(default_factory=list)
    probes: list[list[dict]] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)


def variant_encoders(encoder: EncoderSpec, kind: str, raw_layer: int | None) -> EncoderSpec:
    """The encoder spec a variant uses: `raw` drops the instruction and the template, the rest keep them."""
    if kind != "raw":
        return encoder
    layer = encoder.layer if raw_layer is None else raw_layer
    return encoder.model_copy(update={"instruction": "", "use_chat_template": False, "system_prompt": None,
                                      "layer": layer})


def plan_variants(spec: AblateSpec, encoders: list[EncoderSpec]) -> list[Variant]:
    """The variants in ladder order; per-LLM kinds once per encoder, the others over all of them."""
    plan = []
    for kind in spec.variants:
        groups = [[e] for e in encoders] if kind in spec.per_llm else [encoders]
        plan.extend(Variant(kind, [variant_encoders(e, kind, spec.raw_layer) for e in group]) for group in groups)
    return plan


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_data(spec: AblateSpec, root: Path) -> str:
    """The shapes shards for this data spec (written once; the folder is named by the spec's hash)."""
    from lidit.pipelines.shapes import write_shapes
    from lidit.platform import storage

    d = spec.data
    uri = str(root / f"data-{_short_hash(d.model_dump())}")
    if not storage.exists(storage.join(uri, "dataset.json")):
        write_shapes(uri, train=d.train, heldout=spec.benchmark.prompts, size=d.image_size,
                     shard_size=d.shard_size, seed=d.seed, heldout_percent=d.heldout_percent)
    return uri


def train_variant(spec: AblateSpec, variant: Variant, seed: int, dataset: str, root: Path) -> dict:
    """Train one variant with one seed through `lidit train`; a rerun of the same spec reuses the run."""
    from lidit.jobs.train import (CheckpointSpec, DataSpec, DiffusionSpec, LoopSpec, ModelSpec, OptimSpec,
                                  SamplesSpec, TrainSpec, latest_checkpoint, train)
    from lidit.platform.config import ScalingSpec

    b = spec.budget
    use_refiner, use_collaborative = MODEL_FLAGS[variant.kind]
    name = f"{spec.name}-{_short_hash([b.model_dump(), spec.data.model_dump()])}-{variant.id}-seed{seed}"
    train_spec = TrainSpec(
        name=name, output=str(root / "runs"), workdir=str(root), encoders=variant.encoders,
        # rows in read order: variants of one seed see the same batches, so they differ only in the model
        data=DataSpec(embeddings=dataset, batch_size=b.batch_size, preserve_order=True),
        model=ModelSpec(preset=b.preset, overrides={**b.overrides, "use_refiner": use_refiner,
                                                    "use_collaborative": use_collaborative}),
        optim=OptimSpec(lr=b.lr, warmup_steps=b.warmup_steps, ema_decay=b.ema_decay),
        train=LoopSpec(steps=b.steps, seed=seed, log_every=max(1, b.steps // 20)),
        diffusion=DiffusionSpec(kind=b.schedule),
        checkpoint=CheckpointSpec(every_steps=b.steps, num_to_keep=1, log_final_to_mlflow=False),
        samples=SamplesSpec(prompts=0), scaling=ScalingSpec(num_workers=b.workers, cpus_per_worker=b.cpus_per_worker),
        storage=spec.storage, tracking=spec.tracking, ray=spec.ray)
    result = train(train_spec)
    checkpoint = result.checkpoint_uri or latest_checkpoint(train_spec)  # a finished run trains no further
    return {"name": name, "run_id": result.run_id, "checkpoint": checkpoint, "loss": result.metrics.get("loss")}


def evaluate_checkpoint(spec: AblateSpec, checkpoint: str, label: str, root: Path):
    """`lidit evaluate` on one checkpoint; its files go to `<workdir>/evaluate/<label>/` (the ablation run
    records them, so no evaluate run of its own)."""
    from lidit.jobs.evaluate import EvaluateSpec, evaluate

    return evaluate(EvaluateSpec(model=checkpoint, output=str(root / "evaluate" / label), workdir=str(root),
                                 benchmark=spec.benchmark, probe=spec.probe, log_to_mlflow=False,
                                 storage=spec.storage))


def floor_checkpoint(spec: AblateSpec, encoders: list[EncoderSpec], root: Path) -> str:
    """The untrained full model (every LLM, both refiners): what each training run starts from."""
    from lidit.jobs.evaluate import untrained_checkpoint
    from lidit.models import EncoderConfig
    from lidit.platform import storage

    configs = {e.name: EncoderConfig(**{**e.model_fields_for_fingerprint(),
                                        "path": storage.local_copy(e.path, spec.storage)}) for e in encoders}
    folder = root / "untrained" / _short_hash([spec.budget.model_dump(), [c.to_dict() for c in configs.values()]])
    return untrained_checkpoint(str(folder), configs, spec.budget.preset, spec.data.image_size,
                                seed=spec.seeds[0], **spec.budget.overrides)


def run_ablation(spec: AblateSpec) -> tuple[list[Outcome], str]:
    """Every variant x seed through precompute, train and evaluate; returns the outcomes and the MLflow run."""
    from lidit.jobs.encoders import resolve_encoders
    from lidit.jobs.precompute import PrecomputeSpec, precompute
    from lidit.platform import storage
    from lidit.platform.cluster import init_ray

    root = Path(spec.workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    encoders = resolve_encoders(spec.encoders, spec.models_dir)
    if spec.precompute.encoder_num_cpus is not None:  # an execution setting: the features stay the same
        encoders = [e.model_copy(update={"num_cpus": spec.precompute.encoder_num_cpus}) for e in encoders]
    plan = plan_variants(spec, encoders)
    data = write_data(spec, root)
    init_ray(spec.ray.address, spec.ray.num_cpus)

    datasets: dict[str, str] = {}  # encoder set -> precomputed data set, shared by the variants using it
    outcomes = []
    for variant in plan:
        key = _short_hash([[e.name, e.model_fields_for_fingerprint()] for e in variant.encoders])
        if key not in datasets:
            result = precompute(PrecomputeSpec(
                input=storage.join(data, "train-*.tar"), output=str(root / "embeddings"),
                image_size=spec.data.image_size, encoders=variant.encoders, read_num_cpus=spec.precompute.stage_num_cpus,
                write_num_cpus=spec.precompute.stage_num_cpus, codec={"num_cpus": spec.precompute.stage_num_cpus},
                storage=spec.storage, ray=spec.ray))
            datasets[key] = result.dataset_uri
        outcome = Outcome(variant.id, variant.kind, variant.llms)
        for seed in spec.seeds:
            start = time.monotonic()
            trained = train_variant(spec, variant, seed, datasets[key], root)
            evaluation = evaluate_checkpoint(spec, trained["checkpoint"], trained["name"], root)
            outcome.scores.append(evaluation.scores)
            outcome.probes.append(evaluation.probe)
            outcome.runs.append({**trained, "seed": seed, "dataset": datasets[key], "evaluation": evaluation.output,
                                 "wall_s": round(time.monotonic() - start, 1)})
            log.info("ablation %s seed %d: overall %.3f", variant.id, seed, evaluation.scores["overall"])
        outcomes.append(outcome)
    if spec.floor:
        folder = floor_checkpoint(spec, encoders, root)
        evaluation = evaluate_checkpoint(spec, folder, "untrained", root)
        outcomes.append(Outcome("floor", "floor", "+".join(e.name for e in encoders), [evaluation.scores],
                                [evaluation.probe], [{"checkpoint": folder, "evaluation": evaluation.output}]))
    return outcomes, data


# ---- the comparison table ------------------------------------------------------------------------------

def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (with 2 seeds: the distance of either seed from the mean)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _cell(values: list[float]) -> str:
    mean, half = spread(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {half:.3f}"


def probe_means(outcome: Outcome) -> dict[str, dict[str, float]]:
    """LLM -> {raw, refined, fused}: the probe averaged over seeds."""
    out: dict[str, dict[str, float]] = {}
    for rows in outcome.probes:
        for row in rows:
            for key in ("raw", "refined", "fused"):
                if key in row:
                    out.setdefault(row["encoder"], {}).setdefault(key, []).append(row[key])
    return {llm: {k: sum(v) / len(v) for k, v in values.items()} for llm, values in out.items()}


def table_rows(outcomes: list[Outcome]) -> list[dict]:
    """One row per variant: label, LLMs, seeds, category cells and probe cells (strings for the table)."""
    llms = list(dict.fromkeys(n for o in outcomes for n in o.llms.split("+")))
    rows = []
    for o in outcomes:
        row = {"variant": LABELS[o.kind], "LLMs": o.llms, "seeds": str(len(o.scores))}
        for category in CATEGORIES:
            values = [s[category] for s in o.scores if category in s]
            row[category] = _cell(values) if values else "-"
        probe = probe_means(o)
        for llm in llms:
            p = probe.get(llm)
            row[f"probe {llm} raw/refined/fused"] = (
                " / ".join(f"{p[k]:.3g}" for k in ("raw", "refined", "fused") if k in p) if p else "-")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def findings(outcomes: list[Outcome]) -> list[str]:
    """The paper's findings in miniature: (a) the probe per LLM, (b) the instruction's gain per raw row
    (per LLM by default), (c) the ladder raw < + instruction < + refiner < + collaborative from each raw
    row, step by step, with whether each step is beyond the spread over seeds."""
    by_id = {o.variant: o for o in outcomes}
    llms = list(dict.fromkeys(n for o in outcomes if o.kind != "floor" for n in o.llms.split("+")))
    lines = []
    for llm in llms:
        raw = [p[llm]["raw"] for o in outcomes if (p := probe_means(o)).get(llm) and "raw" in p[llm]]
        refined = {o.variant: p[llm]["refined"] for o in outcomes if o.kind in ("refiner", "concat", "collaborative")
                   and (p := probe_means(o)).get(llm) and "refined" in p[llm]}
        if raw:
            lines.append(f"(a) probe {llm}: raw hidden states change {max(raw):.3g} at most (every variant); after "
                         "the token refiner " + (", ".join(f"{v:.3g} ({k})" for k, v in refined.items()) or "n/a"))
    for raw in (o for o in outcomes if o.kind == "raw"):  # one per LLM, or one over all of them
        instructed = by_id.get(raw.variant.replace("raw-", "instruction-", 1))
        if instructed:
            gains = [b["overall"] - a["overall"] for a, b in zip(raw.scores, instructed.scores)]
            lines.append(f"(b) + instruction for {raw.llms}: overall {spread([s['overall'] for s in raw.scores])[0]:.3f}"
                         f" -> {spread([s['overall'] for s in instructed.scores])[0]:.3f} (gain per seed: "
                         + ", ".join(f"{g:+.3f}" for g in gains) + ")")
    for raw in (o for o in outcomes if o.kind == "raw"):
        later = (raw.variant.replace("raw-", f"{kind}-", 1) for kind in ("instruction", "refiner"))
        ladder = [raw, *(by_id[v] for v in later if v in by_id),
                  *(o for o in outcomes if o.kind in ("concat", "collaborative"))]
        if len(ladder) < 2:
            continue
        steps, holds = [], True
        for low, high in zip(ladder, ladder[1:]):
            a, b = [s["overall"] for s in low.scores], [s["overall"] for s in high.scores]
            delta = spread(b)[0] - spread(a)[0]
            holds &= delta > 0
            separated = "beyond the seed spread" if min(b) > max(a) or max(b) < min(a) else "within the seed spread"
            steps.append(f"{LABELS[high.kind]} {delta:+.3f} ({separated})")
        verdict = "holds" if holds else "does not hold"
        lines.append(f"(c) ladder from raw {raw.llms}: " + "; ".join(steps) + f" -> strict ordering {verdict}")
    return lines


def report(outcomes: list[Outcome]) -> str:
    """The printed (and logged) table with its legend and findings."""
    legend = ("scores: held-out shapes benchmark, mean ± half the range over training seeds; probe: mean relative "
              "change of the earlier caption tokens' features when the last word changes (raw LLM / after its "
              "token refiner / after fusion)")
    return "\n".join([markdown_table(table_rows(outcomes)), "", legend, "", *findings(outcomes)])


def log_ablation(spec: AblateSpec, outcomes: list[Outcome], text: str, extra: dict) -> str:
    """The `ablation` MLflow run: metrics per variant, the table (markdown, JSON, MLflow table) and every
    evaluation's files."""
    from lidit.platform import tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir)
    run_id, _ = tracking.start_run(uri, spec.tracking.experiment, spec.name, tags={"lidit.job": "ablate"})
    tracking.log_spec(uri, run_id, spec)
    metrics = {}
    for o in outcomes:
        for category in CATEGORIES:
            values = [s[category] for s in o.scores if category in s]
            if values:
                metrics[f"{o.variant}.{category}"], metrics[f"{o.variant}.{category}.spread"] = spread(values)
        for llm, probe in probe_means(o).items():
            metrics.update({f"{o.variant}.probe.{llm}.{k}": v for k, v in probe.items()})
    tracking.log_metrics(uri, run_id, metrics, step=0)
    rows = table_rows(outcomes)
    tracking.client(uri).log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "ablation_table.json")
    tracking.log_text(uri, run_id, text + "\n", "ablation.md")
    raw = {"benchmark": spec.benchmark.key(), **extra,
           "variants": [{"variant": o.variant, "kind": o.kind, "llms": o.llms, "scores": o.scores, "probe": o.probes,
                         "runs": o.runs} for o in outcomes]}
    tracking.log_text(uri, run_id, json.dumps(raw, indent=1, default=str), "ablation.json")
    for o in outcomes:
        for run in o.runs:  # local folders: the workdir is local
            tracking.log_artifact(uri, run_id, run["evaluation"], f"evaluations/{run.get('name', 'untrained')}")
    tracking.end_run(uri, run_id)
    return run_id


SPEC = AblateSpec  # the spec class `lidit submit` validates against


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lidit.platform.cli import add_spec_arguments

    add_spec_arguments(parser, required=False)
    parser.add_argument("--encoders", help="encoder preset: real (SmolLM2 + Gemma-3, default) or tiny")
    parser.add_argument("--workdir", help="folder for every output (default .lidit/ablate)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    overrides += [f"encoders={args.encoders}"] if args.encoders else []
    overrides += [f"workdir={args.workdir}"] if args.workdir else []
    spec = load_spec(AblateSpec, args.spec or DEFAULT_CONFIG, overrides)
    start = time.monotonic()
    outcomes, data = run_ablation(spec)
    wall_s = time.monotonic() - start
    text = report(outcomes)
    run_id = log_ablation(spec, outcomes, text, {"data": data, "wall_s": round(wall_s, 1)})
    print(text)
    print(f"lidit ablate: {len(outcomes)} rows in {wall_s / 60:.1f} min; MLflow run {run_id} "
          f"(experiment {spec.tracking.experiment}), artifact ablation.md")
    return 0
