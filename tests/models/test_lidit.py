"""The LiDiT module: shapes at several resolutions and caption lengths, one and two LLMs,
padding invariance, zero-init, presets and the FLOP formula."""

import pytest
import torch

from lidit.models import LiDiT, PromptFeatures, lidit_config
from lidit.models.flops import count_flops


def features(batch: int, length: int, dim: int, start: int, valid: list[int] | None = None) -> PromptFeatures:
    valid = valid or [length] * batch
    mask = torch.arange(length).expand(batch, -1) < torch.tensor(valid).unsqueeze(1)
    return PromptFeatures(torch.randn(batch, length, dim) * mask.unsqueeze(-1), mask, start)


def trained_like(model: LiDiT) -> LiDiT:
    """Give the zero-initialised gates and output layer values, as training would."""
    torch.manual_seed(3)
    for layer in model.modules():
        if getattr(layer, "zero_init", False):
            torch.nn.init.normal_(layer.weight, std=0.05)
    return model


@pytest.mark.parametrize("dims", [[64], [64, 96]])
@pytest.mark.parametrize("size", [(8, 8), (16, 24), (32, 12)])
def test_forward_shapes_any_resolution(dims, size):
    torch.manual_seed(0)
    model = trained_like(LiDiT(lidit_config("tiny", encoder_dims=dims)))
    text = [features(2, 5 + 3 * i, d, start=2, valid=[5 + 3 * i, 4]) for i, d in enumerate(dims)]
    x = torch.randn(2, 3, *size)
    out = model(x, torch.tensor([3, 700]), text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("null_text")]
    assert not unused


def test_fresh_model_predicts_zero_and_rejects_bad_input():
    model = LiDiT(lidit_config("tiny"))
    text = [features(1, 6, 64, 2), features(1, 4, 96, 1)]
    assert model(torch.randn(1, 3, 8, 8), torch.tensor([5]), text).abs().max() == 0  # adaLN-Zero
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 9, 8), torch.tensor([5]), text)
    with pytest.raises(ValueError, match="text: expected features of 2"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([5]), text[:1])
    with pytest.raises(ValueError, match="LiDiTConfig.heads"):
        lidit_config("tiny", heads=5)
    with pytest.raises(ValueError, match="LiDiTConfig.colour"):
        lidit_config("tiny", colour=1)


def test_padding_never_changes_the_prediction():
    """Pad a batch two ways (short and long padding, garbage in the pads): same output."""
    torch.manual_seed(0)
    model = trained_like(LiDiT(lidit_config("tiny"))).eval()
    a, b = features(1, 7, 64, 3), features(1, 5, 96, 2)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([400])
    base = model(x, t, [a, b])
    for extra in (1, 6):
        pad_a = PromptFeatures(torch.cat([a.states, torch.randn(1, extra, 64)], 1),
                               torch.cat([a.mask, torch.zeros(1, extra, dtype=torch.bool)], 1), 3)
        pad_b = PromptFeatures(torch.cat([b.states, torch.randn(1, 2 * extra, 96)], 1),
                               torch.cat([b.mask, torch.zeros(1, 2 * extra, dtype=torch.bool)], 1), 2)
        torch.testing.assert_close(model(x, t, [pad_a, pad_b]), base, atol=1e-5, rtol=1e-5)


def test_text_dropout_uses_the_learned_null_caption():
    torch.manual_seed(0)
    model = trained_like(LiDiT(lidit_config("tiny")))
    text = [features(3, 6, 64, 2, valid=[6, 4, 5]), features(3, 4, 96, 0)]
    dropped = model.drop_text(text, torch.tensor([True, False, True]))
    for before, after, null in zip(text, dropped, model.null_text):
        start = before.caption_start
        assert torch.equal(after.states[1], before.states[1]) and torch.equal(after.mask[1], before.mask[1])
        assert torch.equal(after.states[0, :start], before.states[0, :start])  # instruction kept
        assert torch.equal(after.states[0, start], null.detach())
        assert after.mask[0].sum() == start + 1
    out = model(torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3]), dropped)
    out.sum().backward()
    assert model.null_text[0].grad.abs().sum() > 0


def test_flops_formula_matches_the_flop_counter():
    torch.manual_seed(0)
    model = LiDiT(lidit_config("tiny"))
    text = [features(2, 12, 64, 5), features(2, 9, 96, 4)]
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([1, 2])
    counted = count_flops(lambda: model(x, t, text))
    assert counted == 2 * model.flops_per_image(16, 24, [12, 9], [5, 4])


def test_preset_sizes_match_their_names():
    with torch.device("meta"):
        one_b, ten_b = LiDiT(lidit_config("1b")), LiDiT(lidit_config("10b"))
    assert (one_b.config.depth, one_b.config.width, one_b.config.heads) == (28, 1152, 16)
    assert (ten_b.config.depth, ten_b.config.width, ten_b.config.heads) == (48, 2816, 44)
    assert 0.9e9 < one_b.num_params() < 1.2e9
    assert 9.5e9 < ten_b.num_params() < 11e9
    assert LiDiT(lidit_config("tiny")).num_params() < 2e6
