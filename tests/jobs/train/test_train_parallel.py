"""jobs/train/parallelize.py on 2 CPU processes (gloo): DDP and FSDP2 (+ activation checkpointing) take the same
optimizer step as one process on the whole batch, keep parameter names, and round-trip their state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from lidit.models import LiDiT, PromptFeatures, lidit_config


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    text = [PromptFeatures(torch.randn(4, 5, dim, generator=generator), torch.ones(4, 5, dtype=torch.bool), 2)
            for dim in (64, 96)]
    target = torch.randn(4, 3, 8, 8, generator=generator)
    return x, t, text, target


def _slice(batch, part: slice):
    x, t, text, target = batch
    return x[part], t[part], [PromptFeatures(f.states[part], f.mask[part], f.caption_start) for f in text], target[part]


def _step(model, batch, drop: torch.Tensor) -> dict[str, torch.Tensor]:
    x, t, text, target = batch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # linear in the gradient: exact comparisons
    loss = torch.nn.functional.mse_loss(model(x, t, text, drop_caption=drop), target)
    loss.backward()
    optimizer.step()
    return optimizer


def _worker(rank: int, port: int, strategy: str, out: str) -> None:
    from safetensors.torch import save_file

    from lidit.jobs.train import parallelize as parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = LiDiT(lidit_config("tiny"))
    names = sorted(model.state_dict())
    model = parallel.parallelize(model, parallel.resolve_strategy(strategy, 2), torch.device("cpu"),
                                 activation_checkpointing=strategy == "fsdp")
    drop = torch.tensor([True, False, False, True])
    optimizer = _step(model, _slice(_batch(), slice(2 * rank, 2 * rank + 2)), drop[2 * rank:2 * rank + 2])
    state = parallel.full_state_dict(model)
    if parallel.is_sharded(model):
        tensors, index = parallel.sharded_optimizer_state(optimizer)
        before = {k: v.clone() for k, v in tensors.items()}
        parallel.load_sharded_optimizer_state(optimizer, tensors, index)
        after, _ = parallel.sharded_optimizer_state(optimizer)
        assert all(torch.equal(before[k], after[k]) for k in before)
    if rank == 0:
        assert sorted(state) == names
        save_file(state, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_step_equals_one_process_step(strategy, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "state.safetensors")
    port = str(_free_port())
    workers = [subprocess.Popen([sys.executable, __file__, str(rank), port, strategy, out]) for rank in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    torch.manual_seed(0)
    reference = LiDiT(lidit_config("tiny"))
    _step(reference, _batch(), torch.tensor([True, False, False, True]))
    distributed = load_file(out)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":  # one rank of the test above (run as a script: spawn cannot import test modules)
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
