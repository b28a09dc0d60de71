"""`CheckpointInfo`: the one reader (and writer) of a checkpoint's config.yaml, used by training, evaluation
and serving; one image-size key, `image_size: [height, width]` in pixels."""

import pytest
import yaml

from lidit.models import CheckpointInfo, EncoderConfig, EncoderEntry, LiDiT, lidit_config, read_checkpoint_info
from lidit.models import save_checkpoint


@pytest.fixture(scope="module")
def info(tiny_llms) -> CheckpointInfo:
    encoders = (EncoderEntry("llama", EncoderConfig(tiny_llms["tiny-llama"]), "bfloat16", 64, 40),
                EncoderEntry("qwen", EncoderConfig(tiny_llms["tiny-qwen2"])))
    return CheckpointInfo(lidit_config("tiny", encoder_dims=[64, 96]), encoders, {"kind": "identity"}, (24, 40),
                          {"num_steps": 500, "kind": "cosine", "beta_start": 1e-4, "beta_end": 0.02},
                          {"uri": "s3://b/data", "fingerprint": "abc"})


def test_written_and_read_back_unchanged(info, tmp_path):
    model = LiDiT(info.model)
    save_checkpoint(str(tmp_path), model, None, info)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["image_size"] == [24, 40] and "image_shape" not in config
    assert read_checkpoint_info(str(tmp_path)).to_config() == info.to_config()
    assert info.latent_size == (24, 40) and info.diffusion_schedule().kind == "cosine"


def test_checkpoints_of_older_writers_are_read(info):
    config = info.to_config()
    legacy = {k: v for k, v in config.items() if k not in ("image_size", "schedule")} | {"image_shape": [3, 12, 20]}
    old = CheckpointInfo.from_config(legacy)
    assert old.image_size == (12, 20) and old.schedule["kind"] == "linear"
    assert CheckpointInfo.from_config({**config, "image_size": 48}).image_size == (48, 48)
    mapping = {**config, "encoders": {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in config["encoders"]}}
    assert [e.name for e in CheckpointInfo.from_config(mapping).encoders] == ["llama", "qwen"]


@pytest.mark.parametrize("change, message", [
    ({"image_size": [0, 32]}, "config.image_size: expected"),
    ({"image_size": None}, "config.image_size: expected"),
    ({"codec": None, "drop": "codec"}, "config.codec: missing"),
    ({"encoders": []}, "config.encoders: the checkpoint lists no encoders"),
    ({"model": {"width": 64, "widht": 3}}, "LiDiTConfig.widht: unknown field"),
])
def test_a_bad_config_names_the_field(info, change, message):
    config = {**info.to_config(), **{k: v for k, v in change.items() if k != "drop"}}
    config.pop(change.get("drop"), None)
    with pytest.raises(ValueError, match=message):
        CheckpointInfo.from_config(config)
