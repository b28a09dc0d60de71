"""`lidit demo`: the whole life of a model on embedded defaults, through the same jobs as on a cluster.

1. the encoder LLMs (the real pair by default, imported once from the installed GGUF packages; `--encoders
   tiny` builds two tiny random ones) and the synthetic shapes data;
2. a local Ray; the multi-LLM precompute to Parquet (Ray Data);
3. LI-DiT training with Ray Train, tracked in MLflow (local sqlite store);
4. registration of the checkpoint, evaluation on held-out prompts, promotion to `champion`;
5. Ray Serve on `models:/lidit@champion`: one image requested and saved, the playground URL printed.

The spec embeds the jobs' own specs: `precompute:` is a PrecomputeSpec, `train:` a TrainSpec, `serve:` a
ServeSpec, each less the fields the demo fills in (paths under the work folder, the resolved encoders,
storage, tracking, Ray), so every field of those jobs can be set from the demo's YAML. Every output lives
under one work folder. A stage that finished for the same inputs is reused on a rerun (the record is
`demo-state.json`); precompute and training also resume by themselves after a crash.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, model_validator

from lidit.jobs.evaluate.spec import BenchmarkSpec, PromoteSpec
from lidit.jobs.precompute.presets import EncodersValue
from lidit.jobs.precompute.spec import PrecomputeSpec
from lidit.jobs.serve.spec import ServeSpec
from lidit.jobs.train.spec import TrainSpec
from lidit.pipelines.shapes import ShapesSpec
from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import RaySpec, Spec, StorageSpec, TrackingSpec, embedded_spec

PLACEHOLDER_ENCODERS = [EncoderSpec(name="placeholder", path="placeholder")]  # to validate sections at load


class DemoDataSpec(ShapesSpec):
    uri: str | None = Field(None, description="where the shapes shards go; default <workdir>/data")


class DemoSpec(Spec):
    """`lidit demo` (jobs/configs/demo.yaml, where the demo's choices are stated with their reasons)."""

    workdir: str = ".lidit/demo"
    encoders: EncodersValue = Field("real", description="encoder preset (real, tiny) or an explicit list")
    embeddings: str | None = Field(None, description="precompute output root; default <workdir>/embeddings")
    checkpoints: str | None = Field(None, description="training storage; default <workdir>/checkpoints")
    data: DemoDataSpec = DemoDataSpec()
    precompute: dict[str, Any] = Field(default_factory=dict, description="PrecomputeSpec fields")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainSpec fields")
    benchmark: BenchmarkSpec = BenchmarkSpec()
    serve: dict[str, Any] | None = Field(default_factory=dict, description="ServeSpec fields; null: no serving")
    prompt: str = Field("a red circle to the left of a blue square", description="the first served image's")
    wait: bool = Field(True, description="keep serving until Ctrl-C")
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _sections(self) -> "DemoSpec":
        if (self.benchmark.data_seed, self.benchmark.heldout_percent) != (self.data.seed, self.data.heldout_percent):
            raise ValueError("benchmark.data_seed/heldout_percent: must equal data.seed/heldout_percent (the "
                             "held-out prompts are those the training data leaves out)")
        self.precompute_spec(PLACEHOLDER_ENCODERS, "data", "embeddings")
        self.train_spec(PLACEHOLDER_ENCODERS, "embeddings", "checkpoints", ".")
        if self.serve is not None:
            self.serve_spec(".")
        return self

    def common(self) -> dict[str, Any]:
        return {"storage": self.storage.model_dump(), "ray": self.ray.model_dump()}

    def precompute_spec(self, encoders: list[EncoderSpec], data: str, embeddings: str) -> PrecomputeSpec:
        from lidit.platform import storage

        filled = {"input": storage.join(data, "train-*.tar"), "output": embeddings, "encoders": encoders,
                  "image_size": self.data.image_size, **self.common()}
        return embedded_spec(PrecomputeSpec, self.precompute, filled, "precompute")

    def train_spec(self, encoders: list[EncoderSpec], dataset: str, checkpoints: str, workdir: str) -> TrainSpec:
        filled = {"name": "demo", "output": checkpoints, "workdir": workdir, "encoders": encoders,
                  "data": {"embeddings": dataset}, "tracking": self.tracking.model_dump(), **self.common()}
        return embedded_spec(TrainSpec, self.train, filled, "train")

    def serve_spec(self, workdir: str) -> ServeSpec:
        filled = {"model": f"models:/{self.tracking.registered_model}@champion", "workdir": workdir,
                  "tracking": self.tracking.model_dump(), "poll_interval_s": 0, **self.common()}
        return embedded_spec(ServeSpec, self.serve or {}, filled, "serve")


class Stages:
    """Runs the demo's stages in order, reusing those recorded as done for the same inputs."""

    def __init__(self, workdir: Path, total: int) -> None:
        self.workdir, self.total, self.index = workdir, total, 0
        self.state_file = workdir / "demo-state.json"
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []

    def run(self, name: str, inputs: Any, fn: Callable[[], dict]) -> dict:
        self.index += 1
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = self.state.get(name)
        if done and done.get("inputs") == key:
            print(f"[{self.index}/{self.total}] {name}: reused from an earlier run")
            self.timings[name] = 0.0
            self.reused.append(name)
            return done["outputs"]
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)
        start = time.monotonic()
        outputs = fn()
        self.timings[name] = time.monotonic() - start
        print(f"[{self.index}/{self.total}] {name}: done in {self.timings[name]:.1f}s", flush=True)
        self.state[name] = {"inputs": key, "outputs": outputs}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2))
        return outputs


def run_demo(spec: DemoSpec) -> dict:
    """Run every stage; returns what a user would look at (URIs, run, version, score, image, URL)."""
    from lidit.jobs.precompute.presets import resolve_encoders
    from lidit.platform.tracking import tracking_uri

    workdir = Path(spec.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"lidit demo: every output goes under {workdir}")
    data_uri = spec.data.uri or str(workdir / "data")
    embeddings_uri = spec.embeddings or str(workdir / "embeddings")
    checkpoints_uri = spec.checkpoints or str(workdir / "checkpoints")
    mlflow_uri = tracking_uri(spec.tracking, workdir)
    stages = Stages(workdir, 5 if spec.serve is None else 6)

    stages.run("encoder LLMs", {"encoders": spec.encoders},
               lambda: {"encoders": [e.name for e in resolve_encoders(spec.encoders, workdir / "llms")]})
    encoders = resolve_encoders(spec.encoders, workdir / "llms")  # already built or imported: fast

    def make_data() -> dict:
        from lidit.pipelines.shapes import write_shapes

        write_shapes(data_uri, ShapesSpec(**spec.data.model_dump(exclude={"uri"})), spec.storage)
        return {"uri": data_uri}

    stages.run("synthetic shapes data", {"uri": data_uri, **spec.data.model_dump()}, make_data)

    def precompute() -> dict:
        from lidit.jobs.precompute.driver import format_summary
        from lidit.jobs.precompute.driver import precompute as run_precompute

        result = run_precompute(spec.precompute_spec(encoders, data_uri, embeddings_uri))
        print(format_summary(result))
        return {"dataset": result.dataset_uri, "rows": result.rows}

    precompute_inputs = spec.precompute_spec(encoders, data_uri, embeddings_uri).model_dump(mode="json")
    embeddings = stages.run("precompute (Ray Data)", precompute_inputs, precompute)
    train_spec = spec.train_spec(encoders, embeddings["dataset"], checkpoints_uri, str(workdir))

    def train() -> dict:
        from lidit.jobs.train.driver import train as run_train

        result = run_train(train_spec)
        return {"checkpoint": result.checkpoint_uri, "run_id": result.run_id, "step": result.final_step,
                "loss": result.metrics.get("loss")}

    trained = stages.run("train (Ray Train)", train_spec.model_dump(mode="json"), train)

    def promote() -> dict:
        from lidit.jobs.evaluate.promote import describe
        from lidit.jobs.evaluate.promote import promote as run_promote

        decision = run_promote(PromoteSpec(
            checkpoint=trained["checkpoint"], training_run=trained["run_id"], dataset=embeddings["dataset"],
            output=str(workdir / "evaluate"), workdir=str(workdir), benchmark=spec.benchmark,
            tracking=spec.tracking, storage=spec.storage))
        print(describe(decision))
        return {"version": decision.version, "verdict": decision.decision, "champion": decision.champion,
                "score": decision.candidate_score, "untrained_score": _untrained_score(trained, workdir, spec)}

    promoted = stages.run("register, evaluate, promote (MLflow)", {"trained": trained, "mlflow": mlflow_uri,
                                                                   "benchmark": spec.benchmark.model_dump()}, promote)
    summary = {"workdir": str(workdir), "data": data_uri, "embeddings": embeddings["dataset"],
               "checkpoint": trained["checkpoint"], "run_id": trained["run_id"], "mlflow": mlflow_uri, **promoted}
    print(f"benchmark: held-out prompt following {promoted.get('score', float('nan')):.3f} "
          f"(untrained model {promoted.get('untrained_score', float('nan')):.3f}); "
          f"version {promoted.get('version')} is {promoted.get('verdict')}")
    if spec.serve is not None:
        summary.update(_serve(spec, workdir, mlflow_uri, stages))
    summary["timings_s"] = {k: round(v, 1) for k, v in stages.timings.items()}
    summary["reused"] = stages.reused
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _untrained_score(trained: dict, workdir: Path, spec: DemoSpec) -> float:
    """The benchmark's floor: the same architecture, freshly initialised (what training started from)."""
    from lidit.jobs.evaluate.driver import evaluate, untrained_checkpoint
    from lidit.jobs.evaluate.spec import EvaluateSpec, ProbeSpec
    from lidit.platform import storage

    folder = untrained_checkpoint(storage.local_copy(trained["checkpoint"], spec.storage),
                                  str(workdir / "untrained-checkpoint"))
    result = evaluate(EvaluateSpec(model=folder, output=str(workdir / "evaluate-untrained"), workdir=str(workdir),
                                   benchmark=spec.benchmark, probe=ProbeSpec(enabled=False), log_to_mlflow=False,
                                   storage=spec.storage))
    return result.scores["overall"]


def _serve(spec: DemoSpec, workdir: Path, mlflow_uri: str, stages: Stages) -> dict:
    from lidit.jobs.serve.deploy import serve

    stages.index += 1
    serve_spec = spec.serve_spec(str(workdir))
    print(f"[{stages.index}/{stages.total}] serve {serve_spec.model} (Ray Serve) ...")
    start = time.monotonic()
    served = serve(serve_spec)
    body = json.dumps({"prompt": spec.prompt, "seed": 0, "steps": spec.benchmark.steps,
                       "guidance": spec.benchmark.guidance, "response_format": "png"}).encode()
    request = urllib.request.Request(f"{served.url}/v1/images", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        image = response.read()
    image_path = workdir / "demo.png"
    image_path.write_bytes(image)
    stages.timings["serve"] = time.monotonic() - start
    print(f"[{stages.index}/{stages.total}] serving at {served.url} (up and first image in "
          f"{stages.timings['serve']:.1f}s)")
    print(f"  image for {spec.prompt!r}: {image_path}")
    print(f"  playground: {served.url}/")
    if mlflow_uri.startswith("sqlite:"):
        print(f"  MLflow UI:  mlflow ui --backend-store-uri {mlflow_uri} --host 127.0.0.1 --port 5000")
    else:
        print(f"  MLflow UI:  {mlflow_uri}")
    result = {"url": served.url, "image": str(image_path), "served_version": served.ref.version}
    if spec.wait:
        print("serving until Ctrl-C ...", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...")
    from ray import serve as ray_serve

    served.stop()
    ray_serve.shutdown()  # the demo started Serve (its HTTP proxy on the serve port): stop all of it
    return result
