"""The per-worker training loop run by Ray Train (`TorchTrainer(train_loop_per_worker, ...)`).

Reads top to bottom like DiT's train.py: setup (seeds, model, parallelisms, optimizer, EMA), resume
from `ray.train.get_checkpoint()`, stream the worker's share of the Parquet shards, and every N steps
a checkpoint in the LI-DiT format (model + EMA safetensors, config.yaml, training state) reported to
Ray Train, which copies it to `<output>/<name>/checkpoint_<step>`. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import tempfile
import time

import torch

from lidit.jobs.train import parallelize as parallel
from lidit.jobs.train.ema import EMA
from lidit.jobs.train.spec import TrainSpec
from lidit.models import LiDiT, diffusion_loss, sample
from lidit.models.checkpoint import CheckpointInfo, load_training_state, save_checkpoint
from lidit.models.text_stats import apply_text_statistics
from lidit.platform import storage, tracking

log = logging.getLogger(__name__)


def learning_rate(spec: TrainSpec, step: int) -> float:
    """Linear warmup to `lr`, then constant or cosine down to `min_lr_ratio * lr`."""
    optim, total = spec.optim, spec.train.steps
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(total - optim.warmup_steps, 1)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def to_device(batch, device: torch.device):
    from lidit.models import PromptFeatures

    text = [PromptFeatures(t.states.to(device, non_blocking=True), t.mask.to(device, non_blocking=True), t.caption_start)
            for t in batch.text]
    return batch.images.to(device, non_blocking=True), text


def grid_png(images: torch.Tensor, columns: int = 4) -> bytes:
    """uint8 [B, H, W, 3] -> one PNG with the images in rows of `columns`."""
    from PIL import Image

    batch, height, width, _ = images.shape
    columns = min(columns, batch)
    rows = math.ceil(batch / columns)
    canvas = torch.zeros(rows * height, columns * width, 3, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    buffer = io.BytesIO()
    Image.fromarray(canvas.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class Trainer:
    """One worker's state; `run()` is the loop."""

    def __init__(self, config: dict) -> None:
        import ray.train
        import ray.train.torch

        from lidit.pipelines.embeddings import make_collate_fn, open_embeddings

        self.spec = spec = TrainSpec.model_validate(config["spec"])
        self.config, self.info = config, CheckpointInfo.from_config(config["checkpoint"])
        self.tracking_uri, self.run_id = config["tracking_uri"], config["run_id"]
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.bf16 = spec.train.precision == "bf16" or (spec.train.precision == "auto" and self.device.type == "cuda")
        self.strategy = parallel.resolve_strategy(spec.train.strategy, self.world_size)

        torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
        self.model_config = self.info.model
        model = LiDiT(self.model_config)
        if config.get("text_statistics"):  # a resumed run loads its own from the checkpoint in restore()
            apply_text_statistics(model, config["text_statistics"])
        model = model.to(self.device)
        self.model = parallel.parallelize(model, self.strategy, self.device, self.bf16, spec.train.compile,
                                          spec.train.activation_checkpointing)
        self.sharded = parallel.is_sharded(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.optim.lr, betas=spec.optim.betas,
                                           weight_decay=spec.optim.weight_decay)
        self.ema = EMA(self.model, spec.optim.ema_decay)
        self.schedule = self.info.diffusion_schedule()
        self.generator = torch.Generator()

        self.dataset = open_embeddings(spec.data.embeddings, spec.storage)
        self.collate = make_collate_fn(self.dataset.info, device=self.device)
        self.shard = ray.train.get_dataset_shard("train")
        self.step = 0
        self.resumed_from: int | None = None

    # ---- checkpoints --------------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from Ray Train's latest checkpoint, if any (after a failure or on a rerun)."""
        import ray.train
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder)
            parallel.load_full_state_dict(self.model, state["model"])
            self.ema.load(state["ema"] if state["ema"] is not None else state["model"])
            shard = os.path.join(folder, f"optimizer.rank{self.rank}.json")
            if state["optimizer_state"] is not None and not self.sharded:
                self.optimizer.load_state_dict(state["optimizer_state"])
            elif self.sharded and os.path.isfile(shard):
                with open(shard) as f:
                    index = json.load(f)
                tensors = load_file(os.path.join(folder, f"optimizer.rank{self.rank}.safetensors"))
                parallel.load_sharded_optimizer_state(self.optimizer, tensors, index)
            else:
                log.warning("checkpoint %s has no optimizer state for this strategy/world size: "
                            "starting the optimizer afresh", checkpoint.path)
        self.step = self.resumed_from = int((state["train_state"] or {}).get("step", 0))
        log.info("rank %d: resumed at step %d", self.rank, self.step)

    def save(self, metrics: dict) -> None:
        """Write this step's checkpoint and report it to Ray Train (a barrier for every worker)."""
        import ray.train

        step = self.step
        gather = self.sharded or self.rank == 0  # under FSDP2 every rank takes part in the gathers
        model_state = parallel.full_state_dict(self.model) if gather else {}
        ema_state = self.ema.full_state_dict(model_state) if gather else {}
        train_state = {"step": step, "epoch": self.epoch, "images_seen": step * self.global_batch,
                       "world_size": self.world_size, "strategy": self.strategy, "mlflow_run_id": self.run_id}
        with tempfile.TemporaryDirectory(prefix="lidit-ckpt-", ignore_cleanup_errors=True) as folder:
            if self.sharded:
                from safetensors.torch import save_file

                tensors, index = parallel.sharded_optimizer_state(self.optimizer)
                save_file(tensors, os.path.join(folder, f"optimizer.rank{self.rank}.safetensors"))
                with open(os.path.join(folder, f"optimizer.rank{self.rank}.json"), "w") as f:
                    json.dump(index, f)
            if self.rank == 0:
                with torch.device("meta"):
                    plain = LiDiT(self.model_config)
                plain.load_state_dict(model_state, assign=True)
                optimizer_state = None if self.sharded else self.optimizer.state_dict()
                save_checkpoint(folder, plain, ema_state, self.info, train_state, optimizer_state)
                if step >= self.spec.train.steps and self.spec.checkpoint.log_final_to_mlflow:
                    tracking.log_artifact(self.tracking_uri, self.run_id, folder, "checkpoint")
            wrote = self.rank == 0 or self.sharded
            ray.train.report({**metrics, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if wrote else None,
                             checkpoint_dir_name=f"checkpoint_{step:08d}" if wrote else None)

    # ---- samples -------------------------------------------------------------------------------------

    def eval_prompts(self):
        """The first rows of the shards: fixed prompts whose LLM states are already precomputed."""
        count = self.spec.samples.prompts
        if count == 0:
            return None
        return next(self.dataset.read_batches(batch_size=count))

    def log_samples(self, prompts) -> None:
        """Sample the fixed prompts with the EMA weights and log a PNG grid (rank 0; gathers under FSDP2)."""
        from lidit.models import codec_from_config

        if prompts is None:
            return
        if not (self.sharded or self.rank == 0):
            return
        ema_state = self.ema.full_state_dict(parallel.full_state_dict(self.model))
        if self.rank != 0:
            return
        samples = self.spec.samples
        with torch.device("meta"):
            model = LiDiT(self.model_config)
        model.load_state_dict(ema_state, assign=True)
        model = model.to(self.device, torch.bfloat16 if self.bf16 else torch.float32).eval()
        images, text = to_device(prompts, self.device)
        codec = codec_from_config(self.info.codec, device=self.device)
        latents = sample(model, text, self.schedule, tuple(images.shape), steps=samples.sampler_steps,
                         guidance=samples.guidance, seed=samples.seed,
                         clip_x0=1.0 if self.info.codec.get("kind") == "identity" else None)
        tracking.log_bytes(self.tracking_uri, self.run_id, grid_png(codec.decode(latents.float()).cpu()),
                           f"samples/step_{self.step:08d}.png")

    # ---- the loop ------------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.spec.data.batch_size * self.spec.train.grad_accum * self.world_size

    @property
    def epoch(self) -> float:
        return self.step * self.global_batch / self.config["data"]["rows"]

    def batches(self):
        """Micro-batches for ever. The dataset begins at epoch `data.first_epoch` (`train.data_plan`);
        a resumed worker skips what was consumed since then, so it continues where the checkpoint was."""
        data, plan = self.spec.data, self.config["data"]
        consumed = self.step * self.global_batch - plan["first_epoch"] * plan["rows"]
        skip = max(0, round(consumed / (self.world_size * data.batch_size)))
        while True:
            count = 0
            for batch in self.shard.iter_torch_batches(
                batch_size=data.batch_size, collate_fn=self.collate, drop_last=True,
                prefetch_batches=data.prefetch_batches, local_shuffle_buffer_size=data.local_shuffle_buffer or None,
                local_shuffle_seed=self.spec.train.seed + self.rank,
            ):
                count += 1
                if skip:
                    skip -= 1
                    continue
                yield batch
            if count == 0:
                raise RuntimeError(f"data.batch_size {data.batch_size}: larger than this worker's share of the data")

    def chaos(self) -> None:
        """The fault-tolerance drill: die once, leaving a marker so the restarted worker carries on."""
        chaos = self.spec.chaos
        if chaos is None or self.rank != chaos.rank or self.step != chaos.at_step:
            return
        marker = storage.join(self.spec.run_uri, "chaos", f"killed-at-step-{chaos.at_step}")
        if storage.exists(marker, self.spec.storage):
            return
        self.wait_until_registered((chaos.at_step // self.spec.checkpoint.every_steps) * self.spec.checkpoint.every_steps)
        storage.write_text_atomic(marker, f"rank {self.rank} pid {os.getpid()}\n", self.spec.storage)
        log.warning("chaos: rank %d kills itself at step %d", self.rank, self.step)
        os.kill(os.getpid(), signal.SIGKILL)

    def wait_until_registered(self, step: int, timeout: float = 300.0) -> None:
        """Block until Ray Train's controller lists the checkpoint of `step` in its snapshot file: a
        checkpoint reported but not yet collected when the group dies is not resumed from."""
        if step == 0:
            return
        snapshot = storage.join(self.spec.run_uri, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            storage.filesystem(snapshot, self.spec.storage)[0].invalidate_cache()  # s3fs caches listings
            if storage.exists(snapshot, self.spec.storage) and \
                    f"checkpoint_{step:08d}" in storage.read_text(snapshot, self.spec.storage):
                return
            time.sleep(0.5)
        log.warning("chaos: checkpoint of step %d not registered after %.0f s", step, timeout)

    def train_step(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, grad norm)."""
        spec = self.spec
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(spec, self.step)
        self.generator.manual_seed(spec.train.seed * 1_000_003 + self.step * 4099 + self.rank)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            images, text = to_device(batch, self.device)
            last = i == len(micro_batches) - 1
            with parallel.no_gradient_sync(self.model, active=not last), \
                    parallel.autocast(self.device, self.bf16, self.sharded):
                loss = diffusion_loss(self.model, images, text, self.schedule, generator=self.generator,
                                      text_dropout=self.model_config.text_dropout)
                (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        clip = spec.optim.grad_clip if spec.optim.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        self.step += 1
        return total, norm

    def run(self) -> None:
        spec = self.spec
        self.restore()
        if self.rank == 0 and self.resumed_from:
            tracking.log_metrics(self.tracking_uri, self.run_id, {"resumed_from_step": self.resumed_from},
                                 self.resumed_from)
        prompts = self.eval_prompts() if self.rank == 0 or self.sharded else None
        if prompts is not None and self.rank == 0:
            table = next(self.dataset.iter_tables(spec.samples.prompts, columns=["key", "caption"]))
            lines = [f"{k}\t{c}" for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist())]
            tracking.log_text(self.tracking_uri, self.run_id, "\n".join(lines) + "\n", "samples/prompts.txt")
        batches = self.batches()
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        loss_sum = torch.zeros((), device=self.device)
        norm = torch.zeros(())
        while self.step < spec.train.steps:
            self.chaos()
            wait_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(spec.train.grad_accum)]
            data_wait += time.perf_counter() - wait_start
            loss, norm = self.train_step(micro_batches)
            loss_sum += loss
            window_steps += 1
            step = self.step
            every = spec.samples.every_steps
            samples_due = step == spec.train.steps or bool(every and step % every == 0)
            checkpoint_due = step % spec.checkpoint.every_steps == 0 or step == spec.train.steps
            if step % spec.train.log_every == 0 or checkpoint_due or samples_due:
                metrics = self.window_metrics(loss_sum, norm, window_steps, window_start, data_wait)
                if self.rank == 0:
                    tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step)
                if samples_due:
                    self.log_samples(prompts)
                if checkpoint_due:
                    self.save(metrics)
                window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
                loss_sum.zero_()

    def window_metrics(self, loss_sum: torch.Tensor, norm: torch.Tensor, steps: int, start: float,
                       data_wait: float) -> dict[str, float]:
        """Loss averaged over the window and the workers; throughput of the window."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = max(time.perf_counter() - start, 1e-9)
        loss = loss_sum / steps
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(loss)  # SUM: gloo has no AVG
            loss = loss / self.world_size
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        return {"loss": float(loss), "lr": learning_rate(self.spec, self.step - 1),
                "grad_norm": float(norm), "images_per_s": steps * self.global_batch / elapsed,
                "data_wait_fraction": data_wait / elapsed, "epoch": self.epoch}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config` holds the spec, the model config and the MLflow run."""
    logging.basicConfig(level=logging.INFO)
    Trainer(config).run()
