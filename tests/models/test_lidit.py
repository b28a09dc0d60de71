"""The LiDiT module: shapes at several resolutions and caption lengths, one and two LLMs,
padding invariance, zero-init, text dropout, presets and the FLOP count."""

import pytest
import torch

from lidit.models import LiDiT, PromptFeatures, count_flops, flops_per_image, lidit_config


def features(batch: int, length: int, dim: int, start: int, valid: list[int] | None = None) -> PromptFeatures:
    valid = valid or [length] * batch
    mask = torch.arange(length).expand(batch, -1) < torch.tensor(valid).unsqueeze(1)
    return PromptFeatures(torch.randn(batch, length, dim) * mask.unsqueeze(-1), mask, start)


def trained_like(model: LiDiT) -> LiDiT:
    """Give the zero-initialised gates and output layer values, as training would."""
    torch.manual_seed(3)
    for layer in model.adaln_zero_layers():
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
    zero = list(model.adaln_zero_layers())
    assert len(zero) == 2 * 2 + 2 + 2 + 2  # refiner gates, collaborative modulations, blocks, final layer
    assert all(not layer.weight.any() and not layer.bias.any() for layer in zero)
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
    """Dropped rows see the instruction + the null caption token (the rest masked); kept rows their caption."""
    torch.manual_seed(0)
    model = trained_like(LiDiT(lidit_config("tiny")))
    text = [features(3, 6, 64, 2, valid=[6, 4, 5]), features(3, 4, 96, 0)]
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    drop = torch.tensor([True, False, True])
    out = model(x, t, text, drop_caption=drop)
    for row in range(3):
        row_text = []
        for f, null in zip(text, model.null_text):
            states, mask = f.states[row:row + 1].clone(), f.mask[row:row + 1].clone()
            if drop[row]:
                states[:, f.caption_start:] = 0
                states[:, f.caption_start] = null.detach()
                mask[:, f.caption_start:] = False
                mask[:, f.caption_start] = True
            row_text.append(PromptFeatures(states, mask, f.caption_start))
        expected = model(x[row:row + 1], t[row:row + 1], row_text)
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], model(x, t, text)[0], atol=1e-3)
    out.sum().backward()
    assert model.null_text[0].grad.abs().sum() > 0


def test_null_caption_is_in_the_forward_whenever_a_drop_mask_is_given():
    """DDP's contract: with a drop mask (text dropout > 0) the null caption takes part in every forward,
    even when no row is dropped (zero gradient); without one it is unused (find_unused_parameters)."""
    model = trained_like(LiDiT(lidit_config("tiny")))
    text = [features(2, 6, 64, 2), features(2, 4, 96, 1)]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model(x, t, text, drop_caption=torch.zeros(2, dtype=torch.bool)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.null_text)
    model.zero_grad(set_to_none=True)
    model(x, t, text).sum().backward()
    assert all(p.grad is None for p in model.null_text)


def test_flop_count_on_the_meta_device_matches_a_counted_forward():
    torch.manual_seed(0)
    config = lidit_config("tiny")
    model = LiDiT(config)
    text = [features(2, 12, 64, 5), features(2, 9, 96, 4)]
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([1, 2])
    counted = count_flops(lambda: model(x, t, text))
    assert counted > 0 and counted == 2 * flops_per_image(config, 16, 24, [12, 9], [5, 4])
    # one LLM, causal refiner, no collaborative refiner or pooled text
    config = lidit_config("tiny", encoder_dims=[64], refiner_causal=True, use_collaborative=False, pooled_text="none")
    model = LiDiT(config)
    counted = count_flops(lambda: model(torch.randn(1, 3, 8, 8), torch.tensor([5]), [features(1, 7, 64, 3)]))
    assert counted == flops_per_image(config, 8, 8, 7, 3)
    assert flops_per_image(config, 16, 16, 7, 3) > counted


def test_preset_sizes_match_their_names():
    with torch.device("meta"):
        one_b, ten_b = LiDiT(lidit_config("1b")), LiDiT(lidit_config("10b"))
    assert (one_b.config.depth, one_b.config.width, one_b.config.heads) == (28, 1152, 16)
    assert (ten_b.config.depth, ten_b.config.width, ten_b.config.heads) == (48, 2816, 44)
    assert 0.9e9 < one_b.num_params() < 1.2e9
    assert 9.5e9 < ten_b.num_params() < 11e9
    assert LiDiT(lidit_config("tiny")).num_params() < 2e6
