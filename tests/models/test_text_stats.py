"""Per-channel standardisation of LLM features (models/text_stats.py)."""

import torch

from lidit.models import LiDiT, PromptFeatures, lidit_config
from lidit.models.text_stats import apply_text_statistics, caption_statistics


def _features(batch=8, prefix=3, length=12, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, prefix + length, dim, generator=g) * 2 + 5
    states[..., 3] *= 100  # a "massive activation" channel
    states[:, :prefix] = 1e4  # instruction tokens: must not enter the statistics
    mask = torch.ones(batch, prefix + length, dtype=torch.bool)
    mask[:, -4:] = False
    states[:, -4:] = -1e4  # padding: must not enter either
    return PromptFeatures(states, mask, prefix)


def test_statistics_cover_caption_tokens_only_and_standardise_them():
    a, b = _features(dim=16), _features(dim=24, seed=1)
    stats = caption_statistics([[a, b]])
    assert [s["tokens"] for s in stats] == [8 * 8, 8 * 8]
    model = LiDiT(lidit_config("tiny", encoder_dims=[16, 24]))
    apply_text_statistics(model, stats)
    for features, refiner in zip((a, b), model.token_refiners):
        caption = features.states[:, 3:-4].reshape(-1, features.states.shape[-1])
        z = refiner.standardize(caption)
        assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
        assert torch.allclose(z.std(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-3)


def test_statistics_travel_in_the_state_dict_and_old_checkpoints_load_as_identity():
    model = LiDiT(lidit_config("tiny", encoder_dims=[16, 24]))
    apply_text_statistics(model, caption_statistics([[_features(dim=16), _features(dim=24)]]))
    state = model.state_dict()
    assert "token_refiners.0.standardize.mean" in state
    fresh = LiDiT(lidit_config("tiny", encoder_dims=[16, 24]))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.token_refiners[1].standardize.inv_std, model.token_refiners[1].standardize.inv_std)
    old = {k: v for k, v in state.items() if ".standardize." not in k}
    older = LiDiT(lidit_config("tiny", encoder_dims=[16, 24]))
    older.load_state_dict(old)  # strict: missing statistics are the identity, not an error
    assert torch.equal(older.token_refiners[0].standardize.mean, torch.zeros(16))
    assert torch.equal(older.token_refiners[0].standardize.inv_std, torch.ones(16))
