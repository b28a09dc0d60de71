"""`lidit demo`: the whole life of a model on embedded defaults, through the same jobs as on a cluster.

1. the encoder LLMs (the real pair by default, imported once from the installed GGUF packages; `--encoders
   tiny` builds two tiny random ones) and the synthetic shapes data;
2. a local Ray; the multi-LLM precompute to Parquet (Ray Data);
3. LI-DiT training with Ray Train (2 CPU workers), tracked in MLflow (local sqlite store);
4. registration of the checkpoint, evaluation on held-out prompts, promotion to `champion`;
5. Ray Serve on `models:/lidit@champion`: one image requested and saved, the playground URL printed.

Every output lives under one work folder. A stage that finished for the same inputs is reused on a rerun
(the record is `demo-state.json`); precompute and training also resume by themselves after a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from lidit.jobs.train import ScheduleKind
from lidit.platform.config import RaySpec, Spec, StorageSpec, TrackingSpec, load_spec

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


class DemoDataSpec(Spec):
    uri: str | None = Field(None, description="where the shapes shards go; default <workdir>/data")
    train: int = Field(2000, gt=0)
    heldout: int = Field(200, gt=0)
    image_size: int = Field(32, ge=8)
    shard_size: int = Field(250, gt=0)
    seed: int = 0


class DemoTrainSpec(Spec):
    preset: str = Field("mini", description="LiDiT preset; `mini` is sized for 32 px on a 2-core CPU")
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(16, gt=0, description="per worker")
    lr: float = Field(1e-3, gt=0)
    schedule: ScheduleKind = Field(
        "cosine", description="DDPM noise schedule; cosine: 32 px pixel-space images learn their captions reliably")
    workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0, description="leave CPUs free for the Ray Data reader on 2 cores")
    checkpoint_every: int = Field(200, gt=0)


class DemoEvaluateSpec(Spec):
    prompts: int = Field(48, gt=0)
    steps: int = Field(20, gt=0)
    guidance: float = Field(4.0, ge=1.0)


class DemoServeSpec(Spec):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, le=65535)
    prompt: str = "a red circle to the left of a blue square"
    wait: bool = Field(True, description="keep serving until Ctrl-C")


class DemoSpec(Spec):
    workdir: str = ".lidit/demo"
    encoders: str | list = Field("real", description="encoder preset (real, tiny) or an explicit list")
    embeddings: str | None = Field(None, description="precompute output root; default <workdir>/embeddings")
    checkpoints: str | None = Field(None, description="training storage; default <workdir>/checkpoints")
    data: DemoDataSpec = DemoDataSpec()
    train: DemoTrainSpec = DemoTrainSpec()
    evaluate: DemoEvaluateSpec = DemoEvaluateSpec()
    serve: DemoServeSpec = DemoServeSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec(num_cpus=2)


class Stages:
    """Runs the demo's stages in order, reusing those recorded as done for the same inputs."""

    def __init__(self, workdir: Path, total: int) -> None:
        self.workdir, self.total, self.index = workdir, total, 0
        self.state_file = workdir / "demo-state.json"
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.timings: dict[str, float] = {}

    def run(self, name: str, inputs: Any, fn: Callable[[], dict]) -> dict:
        self.index += 1
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        done = self.state.get(name)
        if done and done.get("inputs") == key:
            print(f"[{self.index}/{self.total}] {name}: reused from an earlier run")
            self.timings[name] = 0.0
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


def _encoder_specs(spec: DemoSpec, workdir: Path):
    from lidit.jobs.encoders import resolve_encoders

    return resolve_encoders(spec.encoders, workdir / "llms")


def run_demo(spec: DemoSpec) -> dict:
    """Run every stage; returns what a user would look at (URIs, run, version, score, image, URL)."""
    from lidit.platform import storage
    from lidit.platform.tracking import tracking_uri

    workdir = Path(spec.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"lidit demo: every output goes under {workdir}")
    data_uri = spec.data.uri or str(workdir / "data")
    embeddings_uri = spec.embeddings or str(workdir / "embeddings")
    checkpoints_uri = spec.checkpoints or str(workdir / "checkpoints")
    mlflow_uri = tracking_uri(spec.tracking, workdir)
    stages = Stages(workdir, 6 if spec.serve.enabled else 5)

    encoders = stages.run("encoder LLMs", {"encoders": spec.encoders},
                          lambda: {"encoders": [e.model_dump(mode="json") for e in _encoder_specs(spec, workdir)]})
    encoder_specs = _encoder_specs(spec, workdir) if encoders else []

    def make_data() -> dict:
        from lidit.pipelines.shapes import write_shapes

        d = spec.data
        write_shapes(data_uri, train=d.train, heldout=d.heldout, size=d.image_size, shard_size=d.shard_size,
                     seed=d.seed, storage=spec.storage)
        return {"uri": data_uri}

    stages.run("synthetic shapes data", {"uri": data_uri, **spec.data.model_dump()}, make_data)

    def precompute() -> dict:
        from lidit.jobs.precompute import PrecomputeSpec, format_summary
        from lidit.jobs.precompute import precompute as run_precompute

        result = run_precompute(PrecomputeSpec(
            input=storage.join(data_uri, "train-*.tar"), output=embeddings_uri, image_size=spec.data.image_size,
            encoders=encoder_specs, storage=spec.storage, ray=spec.ray))
        print(format_summary(result))
        return {"dataset": result.dataset_uri, "rows": result.rows}

    embeddings = stages.run("precompute (Ray Data)", {"encoders": encoders, "data": data_uri,
                                                      "out": embeddings_uri}, precompute)

    def train() -> dict:
        from lidit.jobs.train import (CheckpointSpec, DataSpec, DiffusionSpec, LoopSpec, ModelSpec, OptimSpec,
                                      SamplesSpec, TrainSpec)
        from lidit.jobs.train import train as run_train
        from lidit.platform.config import ScalingSpec

        t = spec.train
        result = run_train(TrainSpec(
            name="demo", output=checkpoints_uri, workdir=str(workdir), encoders=encoder_specs,
            data=DataSpec(embeddings=embeddings["dataset"], batch_size=t.batch_size),
            model=ModelSpec(preset=t.preset), optim=OptimSpec(lr=t.lr, warmup_steps=min(50, t.steps // 10)),
            train=LoopSpec(steps=t.steps, log_every=max(1, t.steps // 20)), diffusion=DiffusionSpec(kind=t.schedule),
            checkpoint=CheckpointSpec(every_steps=t.checkpoint_every),
            samples=SamplesSpec(prompts=4, every_steps=t.checkpoint_every),
            scaling=ScalingSpec(num_workers=t.workers, cpus_per_worker=t.cpus_per_worker), storage=spec.storage, tracking=spec.tracking, ray=spec.ray))
        return {"checkpoint": result.checkpoint_uri, "run_id": result.run_id, "step": result.final_step,
                "loss": result.metrics.get("loss")}

    trained = stages.run("train (Ray Train)", {"embeddings": embeddings, "train": spec.train.model_dump(),
                                               "out": checkpoints_uri}, train)

    def promote() -> dict:
        from lidit.jobs.evaluate import BenchmarkSpec
        from lidit.jobs.promote import PromoteSpec, describe
        from lidit.jobs.promote import promote as run_promote

        benchmark = BenchmarkSpec(prompts=spec.evaluate.prompts, steps=spec.evaluate.steps,
                                  guidance=spec.evaluate.guidance, data_seed=spec.data.seed,
                                  image_size=spec.data.image_size)
        decision = run_promote(PromoteSpec(
            checkpoint=trained["checkpoint"], training_run=trained["run_id"], dataset=embeddings["dataset"],
            output=str(workdir / "evaluate"), workdir=str(workdir), benchmark=benchmark,
            tracking=spec.tracking, storage=spec.storage))
        print(describe(decision))
        return {"version": decision.version, "verdict": decision.decision, "champion": decision.champion,
                "score": decision.candidate_score, "untrained_score": _untrained_score(trained, benchmark, workdir,
                                                                                      spec)}

    promoted = stages.run("register, evaluate, promote (MLflow)", {"trained": trained, "mlflow": mlflow_uri,
                                                                   "evaluate": spec.evaluate.model_dump()}, promote)
    summary = {"workdir": str(workdir), "data": data_uri, "embeddings": embeddings["dataset"],
               "checkpoint": trained["checkpoint"], "run_id": trained["run_id"], "mlflow": mlflow_uri, **promoted}
    print(f"benchmark: held-out prompt following {promoted.get('score', float('nan')):.3f} "
          f"(untrained model {promoted.get('untrained_score', float('nan')):.3f}); "
          f"version {promoted.get('version')} is {promoted.get('verdict')}")
    if spec.serve.enabled:
        summary.update(_serve(spec, workdir, mlflow_uri, stages))
    summary["timings_s"] = {k: round(v, 1) for k, v in stages.timings.items()}
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _untrained_score(trained: dict, benchmark, workdir: Path, spec: DemoSpec) -> float:
    """The benchmark's floor: the same architecture, freshly initialised (what training started from)."""
    import torch
    import yaml

    from lidit.jobs.evaluate import EvaluateSpec, ProbeSpec, evaluate
    from lidit.models import LiDiT, LiDiTConfig, save_checkpoint
    from lidit.platform import storage

    trained_dir = storage.local_copy(trained["checkpoint"], spec.storage)
    config = yaml.safe_load((Path(trained_dir) / "config.yaml").read_text())
    torch.manual_seed(0)
    model = LiDiT(LiDiTConfig.from_dict(config["model"]))
    folder = workdir / "untrained-checkpoint"
    save_checkpoint(str(folder), model, model, {k: v for k, v in config.items() if k != "model"})
    result = evaluate(EvaluateSpec(model=str(folder), output=str(workdir / "evaluate-untrained"),
                                   workdir=str(workdir), benchmark=benchmark, probe=ProbeSpec(enabled=False),
                                   log_to_mlflow=False, storage=spec.storage))
    return result.scores["overall"]


def _serve(spec: DemoSpec, workdir: Path, mlflow_uri: str, stages: Stages) -> dict:
    from lidit.jobs.serve import ServeSpec, serve

    stages.index += 1
    print(f"[{stages.index}/{stages.total}] serve models:/{spec.tracking.registered_model}@champion (Ray Serve) ...")
    start = time.monotonic()
    served = serve(ServeSpec(model_uri=f"models:/{spec.tracking.registered_model}@champion",
                             tracking=spec.tracking, workdir=str(workdir), storage=spec.storage, ray=spec.ray,
                             host=spec.serve.host, port=spec.serve.port, poll_interval_s=0))
    size = spec.data.image_size
    body = json.dumps({"prompt": spec.serve.prompt, "seed": 0, "steps": spec.evaluate.steps,
                       "guidance": spec.evaluate.guidance, "width": size, "height": size,
                       "response_format": "png"}).encode()
    request = urllib.request.Request(f"{served.url}/v1/images", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        image = response.read()
    image_path = workdir / "demo.png"
    image_path.write_bytes(image)
    stages.timings["serve"] = time.monotonic() - start
    print(f"[{stages.index}/{stages.total}] serving at {served.url} (up and first image in "
          f"{stages.timings['serve']:.1f}s)")
    print(f"  image for {spec.serve.prompt!r}: {image_path}")
    print(f"  playground: {served.url}/")
    if mlflow_uri.startswith("sqlite:"):
        print(f"  MLflow UI:  mlflow ui --backend-store-uri {mlflow_uri} --host 127.0.0.1 --port 5000")
    else:
        print(f"  MLflow UI:  {mlflow_uri}")
    result = {"url": served.url, "image": str(image_path), "served_version": served.ref.version}
    if spec.serve.wait:
        print("serving until Ctrl-C ...", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...")
    from ray import serve as ray_serve

    served.stop()
    ray_serve.shutdown()  # the demo started Serve (its HTTP proxy on spec.serve.port): stop all of it
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_CONFIG), help="YAML spec (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--workdir", help="folder for every output (default .lidit/demo)")
    parser.add_argument("--encoders", help="encoder preset: real (SmolLM2 + Gemma-3, default) or tiny (smoke run)")
    parser.add_argument("--no-wait", action="store_true", help="stop serving after the first image")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    if args.encoders:
        overrides.append(f"encoders={args.encoders}")
    if args.no_wait:
        overrides.append("serve.wait=false")
    spec = load_spec(DemoSpec, args.spec, overrides)
    start = time.monotonic()
    try:
        summary = run_demo(spec)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print(f"lidit demo: finished in {time.monotonic() - start:.0f}s; stage times (s): "
          + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()))
    return 0
