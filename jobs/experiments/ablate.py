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

The spec embeds the jobs' own specs: `precompute:` is a PrecomputeSpec and `train:` a TrainSpec (the budget,
the same for every variant), each less the fields the ablation fills in per variant (paths, encoders, the
seed, the model flags the variant changes, `data.preserve_order`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lidit.jobs.evaluate.spec import BenchmarkSpec, ProbeSpec
from lidit.jobs.precompute.presets import EncodersValue
from lidit.jobs.precompute.spec import PrecomputeSpec
from lidit.jobs.train.spec import TrainSpec
from lidit.pipelines.shapes import ShapesSpec
from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import RaySpec, Spec, StorageSpec, TrackingSpec, embedded_spec

log = logging.getLogger(__name__)

Kind = Literal["raw", "instruction", "refiner", "concat", "collaborative"]
LABELS = {"raw": "raw LLM", "instruction": "+ instruction", "refiner": "+ token refiner",
          "concat": "+ both LLMs, concat", "collaborative": "+ collaborative refiner", "floor": "untrained floor"}
# what each kind changes in LiDiTConfig: (use_refiner, use_collaborative)
MODEL_FLAGS = {"raw": (False, False), "instruction": (False, False), "refiner": (True, False),
               "concat": (True, False), "collaborative": (True, True)}
PLACEHOLDER_ENCODERS = [EncoderSpec(name="placeholder", path="placeholder")]  # to validate sections at load


class AblateSpec(Spec):
    """`lidit ablate` (jobs/configs/ablate.yaml, where the ablation's choices are stated with their reasons)."""

    name: str = Field("ablation", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow run name")
    workdir: str = Field(".lidit/ablate", description="data, embeddings, checkpoints, evaluations, sqlite MLflow")
    encoders: EncodersValue = Field("real", description="preset (real, tiny) or list (lidit.jobs.precompute.presets)")
    models_dir: str | None = Field(None, description="where preset LLMs are built/imported; None: $LIDIT_CACHE/models")
    encoder_num_cpus: float | None = Field(None, gt=0, description="CPUs per LLM actor in precompute (an execution "
                                                                  "setting); None: the encoder specs' own")
    raw_layer: int | None = Field(None, description="layer of the raw rows; None: each encoder's own (default -3)")
    variants: list[Kind] = Field(["raw", "instruction", "refiner", "collaborative"], min_length=1)
    per_llm: list[Kind] = Field(["raw", "instruction", "refiner"], description="variants run once per LLM")
    seeds: list[int] = Field([0, 1], min_length=1, description="training seeds; >= 2 to see the spread")
    data: ShapesSpec = ShapesSpec()
    precompute: dict[str, Any] = Field(default_factory=dict, description="PrecomputeSpec fields")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainSpec fields: the budget of every variant")
    benchmark: BenchmarkSpec = BenchmarkSpec()
    probe: ProbeSpec = ProbeSpec()
    floor: bool = Field(True, description="also evaluate the untrained full model (the benchmark's floor)")
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _consistent(self) -> "AblateSpec":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: each seed once")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants: each variant once")
        if self.benchmark.data_seed != self.data.seed or self.benchmark.heldout_percent != self.data.heldout_percent:
            raise ValueError("benchmark.data_seed/heldout_percent: must equal data.seed/heldout_percent "
                             "(the held-out prompts are those the training data leaves out)")
        self.precompute_spec(PLACEHOLDER_ENCODERS, "data", "embeddings")
        self.train_spec("placeholder", "kind", PLACEHOLDER_ENCODERS, 0, "embeddings", ".")
        return self

    def common(self) -> dict[str, Any]:
        return {"storage": self.storage.model_dump(), "ray": self.ray.model_dump()}

    def precompute_spec(self, encoders: list[EncoderSpec], data: str, output: str) -> PrecomputeSpec:
        from lidit.platform import storage

        filled = {"input": storage.join(data, "train-*.tar"), "output": output, "encoders": encoders,
                  "image_size": self.data.image_size, **self.common()}
        return embedded_spec(PrecomputeSpec, self.precompute, filled, "precompute")

    def train_spec(self, name: str, kind: str, encoders: list[EncoderSpec], seed: int, dataset: str,
                   root: str) -> TrainSpec:
        use_refiner, use_collaborative = MODEL_FLAGS.get(kind, (True, True))
        filled = {"name": name, "output": str(Path(root) / "runs"), "workdir": root, "encoders": encoders,
                  # rows in read order: variants of one seed see the same batches, so they differ only in the model
                  "data": {"embeddings": dataset, "preserve_order": True},
                  "model": {"overrides": {"use_refiner": use_refiner, "use_collaborative": use_collaborative}},
                  "train": {"seed": seed}, "tracking": self.tracking.model_dump(), **self.common()}
        return embedded_spec(TrainSpec, self.train, filled, "train")


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
    items: list[dict[str, list[dict]]] = field(default_factory=list)  # per seed: per-item verdicts (ablate_report)


def verdicts(evaluation) -> dict[str, list[dict]]:
    """Per held-out item, the category -> correct verdicts of both scores, in the benchmark's order (the
    same items for every variant, so differences between variants can be paired)."""
    from lidit.jobs.evaluate.spec import CATEGORIES

    sampled = [{c: r[c] for c in CATEGORIES if c in r} for r in evaluation.rows]
    by_image: dict[int, dict] = {}
    for row in evaluation.likelihood_rows:
        by_image.setdefault(row["image"], {})[row["category"]] = row["correct"]
    return {"sampled": sampled, "likelihood": list(by_image.values())}


def variant_encoders(encoder: EncoderSpec, kind: str, raw_layer: int | None) -> EncoderSpec:
    """The encoder spec a variant uses: `raw` drops the instruction and the template, the rest keep them."""
    if kind != "raw":
        return encoder
    layer = encoder.layer if raw_layer is None else raw_layer
    return dataclasses.replace(encoder, instruction="", use_chat_template=False, system_prompt=None, layer=layer)


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

    uri = str(root / f"data-{_short_hash(spec.data.model_dump())}")
    if not storage.exists(storage.join(uri, "dataset.json")):
        write_shapes(uri, spec.data)
    return uri


def train_variant(spec: AblateSpec, variant: Variant, seed: int, dataset: str, root: Path) -> dict:
    """Train one variant with one seed through `lidit train`; a rerun of the same spec reuses the run."""
    from lidit.jobs.train.driver import latest_checkpoint, train

    name = f"{spec.name}-{_short_hash([spec.train, spec.data.model_dump()])}-{variant.id}-seed{seed}"
    train_spec = spec.train_spec(name, variant.kind, variant.encoders, seed, dataset, str(root))
    result = train(train_spec)
    checkpoint = result.checkpoint_uri or latest_checkpoint(train_spec)  # a finished run trains no further
    return {"name": name, "run_id": result.run_id, "checkpoint": checkpoint, "loss": result.metrics.get("loss")}


def evaluate_checkpoint(spec: AblateSpec, checkpoint: str, label: str, root: Path):
    """`lidit evaluate` on one checkpoint; its files go to `<workdir>/evaluate/<label>/` (the ablation run
    records them, so no evaluate run of its own)."""
    from lidit.jobs.evaluate.driver import evaluate
    from lidit.jobs.evaluate.spec import EvaluateSpec

    return evaluate(EvaluateSpec(model=checkpoint, output=str(root / "evaluate" / label), workdir=str(root),
                                 benchmark=spec.benchmark, probe=spec.probe, log_to_mlflow=False,
                                 storage=spec.storage))


def floor_checkpoint(spec: AblateSpec, trained: str, root: Path) -> str:
    """The untrained full model (every LLM, both refiners), what each training run starts from: the
    architecture of `trained` (a run over every LLM) with both refiners, freshly initialised."""
    from lidit.jobs.evaluate.driver import untrained_checkpoint
    from lidit.platform import storage

    folder = root / "untrained" / _short_hash([spec.train, trained])
    return untrained_checkpoint(storage.local_copy(trained, spec.storage), str(folder), seed=spec.seeds[0],
                                use_refiner=True, use_collaborative=True)


def run_ablation(spec: AblateSpec) -> tuple[list[Outcome], str]:
    """Every variant x seed through precompute, train and evaluate; returns the outcomes and the data set."""
    from lidit.jobs.precompute.driver import precompute
    from lidit.jobs.precompute.presets import resolve_encoders
    from lidit.platform.cluster import init_ray

    root = Path(spec.workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    encoders = resolve_encoders(spec.encoders, spec.models_dir)
    if spec.encoder_num_cpus is not None:  # an execution setting: the features stay the same
        encoders = [dataclasses.replace(e, num_cpus=spec.encoder_num_cpus) for e in encoders]
    plan = plan_variants(spec, encoders)
    data = write_data(spec, root)
    init_ray(spec.ray.address, spec.ray.num_cpus)

    datasets: dict[str, str] = {}  # encoder set -> precomputed data set, shared by the variants using it
    outcomes, full_model = [], None
    for variant in plan:
        key = _short_hash([[e.name, e.features().to_dict()] for e in variant.encoders])
        if key not in datasets:
            result = precompute(spec.precompute_spec(variant.encoders, data, str(root / "embeddings")))
            datasets[key] = result.dataset_uri
        outcome = Outcome(variant.id, variant.kind, variant.llms)
        for seed in spec.seeds:
            start = time.monotonic()
            trained = train_variant(spec, variant, seed, datasets[key], root)
            evaluation = evaluate_checkpoint(spec, trained["checkpoint"], trained["name"], root)
            outcome.scores.append(evaluation.scores)
            outcome.probes.append(evaluation.probe)
            outcome.items.append(verdicts(evaluation))
            outcome.runs.append({**trained, "seed": seed, "dataset": datasets[key], "evaluation": evaluation.output,
                                 "wall_s": round(time.monotonic() - start, 1)})
            log.info("ablation %s seed %d: overall %.3f", variant.id, seed, evaluation.scores["overall"])
            if len(variant.encoders) == len(encoders) and variant.kind != "raw":
                full_model = full_model or trained["checkpoint"]
        outcomes.append(outcome)
    if spec.floor and full_model is None:
        log.warning("ablation: no variant over every LLM with its instruction was trained: no untrained floor")
    elif spec.floor:
        folder = floor_checkpoint(spec, full_model, root)
        evaluation = evaluate_checkpoint(spec, folder, "untrained", root)
        outcomes.append(Outcome("floor", "floor", "+".join(e.name for e in encoders), [evaluation.scores],
                                [evaluation.probe], [{"checkpoint": folder, "evaluation": evaluation.output}],
                                [verdicts(evaluation)]))
    return outcomes, data
