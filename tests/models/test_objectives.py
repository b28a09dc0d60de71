"""Objectives and samplers against closed forms: for Gaussian data the exact denoiser is known, so a
sampler driven by it must carry N(0, 1) noise to the data distribution; its error measures the sampler."""

import pytest
import torch
from torch import nn

from lidit.models import CheckpointInfo, DiffusionSchedule, EncoderConfig, EncoderEntry, IdentityCodec, LiDiT, denoising_error, lidit_config
from lidit.models.diffusion import diffusion_loss, sample

MU, SIGMA = 0.5, 0.3  # the data: x0 ~ N(MU, SIGMA^2) per pixel


class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] (eps objective) or E[noise - x0 | x_t] (flow) for x0 ~ N(MU, SIGMA^2)."""

    def __init__(self, schedule: DiffusionSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.anchor = nn.Parameter(torch.zeros(()))  # the samplers read device and dtype off a parameter

    def forward(self, x, t, text, drop_caption=None):
        view = (-1, 1, 1, 1)
        if self.schedule.objective == "flow":
            s = (t.float() / self.schedule.num_steps).view(view)
            a, b = 1 - s, s
        else:
            abar = self.schedule.alphas_cumprod[t.long().cpu()].float().view(view)
            a, b = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * SIGMA**2 + b**2
        noise = b * (x - a * MU) / var
        if self.schedule.objective == "eps":
            return noise
        x0 = MU + a * SIGMA**2 * (x - a * MU) / var
        return noise - x0


def moments(schedule: DiffusionSchedule, steps: int) -> tuple[float, float]:
    x = sample(GaussianOracle(schedule), [], schedule, (4000, 1, 2, 2), steps=steps, guidance=1.0, seed=0)
    return x.mean().item(), x.std().item()


def test_every_sampler_carries_noise_to_the_data_and_dpm_solver_beats_ddim_at_few_steps():
    for schedule in (DiffusionSchedule(sampler="ddim"), DiffusionSchedule(sampler="dpm++2m"),
                     DiffusionSchedule(objective="flow")):
        mean, std = moments(schedule, 200)
        assert abs(mean - MU) < 0.01 and abs(std - SIGMA) < 0.015, (schedule.sampler, mean, std)
    ddim, dpm = moments(DiffusionSchedule(sampler="ddim"), 50), moments(DiffusionSchedule(sampler="dpm++2m"), 50)
    assert abs(dpm[1] - SIGMA) < 0.5 * abs(ddim[1] - SIGMA), (ddim, dpm)  # second order: a smaller error


def test_the_oracle_has_zero_denoising_error_for_its_objective_only():
    """`denoising_error` compares against the objective's target: noise for eps, noise - x0 for flow."""
    torch.manual_seed(0)
    x0, noise = torch.full((8, 1, 2, 2), MU), torch.randn(8, 1, 2, 2)
    for schedule in (DiffusionSchedule(), DiffusionSchedule(objective="flow")):
        t = schedule.draw_timesteps(8, torch.Generator().manual_seed(1))
        oracle = GaussianOracle(schedule)
        exact = type("Exact", (nn.Module,), {"forward": lambda self, x, tm, text, drop_caption=None:
                                             schedule.target(x0, noise)})()
        assert denoising_error(exact, x0, [], schedule, t, noise).abs().max() == 0
        assert denoising_error(oracle, x0, [], schedule, t, noise).min() > 0  # it does not know this x0
    flow_t = DiffusionSchedule(objective="flow").draw_timesteps(20000, torch.Generator().manual_seed(0))
    assert 0 < flow_t.min() and flow_t.max() < 1 and abs(flow_t.median().item() - 0.5) < 0.02  # logit-normal(0, 1)


def test_min_snr_weights_are_min_snr_over_snr_and_change_the_loss():
    schedule = DiffusionSchedule(min_snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 999])
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    assert torch.allclose(schedule.loss_weight(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert schedule.loss_weight(t)[0] < 0.01 and schedule.loss_weight(t)[-1] == 1.0  # low noise down-weighted
    assert DiffusionSchedule().loss_weight(t) is None
    model = LiDiT(lidit_config("tiny", encoder_dims=[8]))
    from lidit.models import PromptFeatures

    text = [PromptFeatures(torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool), 1)]
    x0 = torch.randn(4, 3, 8, 8)
    plain, weighted = (diffusion_loss(model, x0, text, s, text_dropout=0.0, generator=torch.Generator().manual_seed(0))
                       for s in (DiffusionSchedule(), schedule))
    assert weighted < plain  # the same draws, some down-weighted


def test_samplers_belong_to_their_objective_and_the_checkpoint_records_the_choice(tiny_llms, tmp_path):
    with pytest.raises(ValueError, match="schedule.sampler"):
        DiffusionSchedule(objective="flow", sampler="ddim")
    with pytest.raises(ValueError, match="schedule.sampler"):
        DiffusionSchedule(sampler="euler")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionSchedule(objective="flow", min_snr_gamma=5.0)
    from lidit.models import save_checkpoint
    from lidit.models.checkpoint import read_checkpoint_info

    schedule = DiffusionSchedule(objective="flow")
    model = LiDiT(lidit_config("tiny", encoder_dims=[8]))
    encoders = (EncoderEntry("llm", EncoderConfig(path=tiny_llms["tiny-llama"]), hidden_size=8),)
    save_checkpoint(str(tmp_path), model, None, CheckpointInfo(model.config, encoders, IdentityCodec().config(),
                                                               (8, 8), schedule.config()))
    loaded = read_checkpoint_info(str(tmp_path)).diffusion_schedule()
    assert (loaded.objective, loaded.sampler) == ("flow", "euler")
    legacy = CheckpointInfo.from_config({**read_checkpoint_info(str(tmp_path)).to_config(),
                                         "schedule": {"num_steps": 1000, "kind": "linear"}})
    assert legacy.diffusion_schedule().objective == "eps"  # checkpoints from before the choice existed


def test_a_flow_spec_names_the_field_when_the_sampler_does_not_fit():
    from lidit.jobs.train.spec import DiffusionSpec
    from lidit.platform.config import LiditError, parse_spec

    assert DiffusionSpec(objective="flow").schedule().sampler == "euler"
    with pytest.raises((LiditError, ValueError), match="sampler"):
        parse_spec(DiffusionSpec, {"objective": "flow", "sampler": "dpm++2m"})
