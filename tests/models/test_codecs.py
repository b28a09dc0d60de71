"""Image codecs: identity pixels and a diffusers AutoencoderKL saved locally (tiny, random)."""

import pytest
import torch

from lidit.models import IdentityCodec, VAECodec, codec_from_config


def test_identity_codec_round_trip():
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8)
    codec = IdentityCodec()
    latents = codec.encode(images)
    assert latents.shape == (2, 3, 8, 12) and latents.min() >= -1 and latents.max() <= 1
    assert torch.equal(codec.decode(latents), images)
    assert isinstance(codec_from_config(codec.config()), IdentityCodec)
    with pytest.raises(ValueError, match="images"):
        codec.encode(images.float())
    with pytest.raises(ValueError, match="codec.kind"):
        codec_from_config({"kind": "jpeg"})


def test_vae_codec_from_a_local_folder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1,
    )
    vae.save_pretrained(tmp_path / "vae")
    codec = VAECodec(str(tmp_path / "vae"))
    assert (codec.channels, codec.downsample) == (4, 2)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        mean = vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.1) * 0.5)
    decoded = codec.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.uint8
    again = codec_from_config(codec.config())
    assert torch.equal(again.encode(images), latents)
    with pytest.raises(ValueError, match="codec.revision"):
        codec_from_config({**codec.config(), "revision": "0" * 40})
