"""TextToImagePipeline: a checkpoint folder in, deterministic uint8 images out."""

import shutil

import pytest
import torch

from lidit.models import CheckpointInfo, EncoderConfig, EncoderEntry, IdentityCodec, LiDiT, lidit_config, save_checkpoint
from lidit.models.generate import TextToImagePipeline


@pytest.fixture(scope="module")
def checkpoint(tiny_llms, tmp_path_factory):
    torch.manual_seed(0)
    model = LiDiT(lidit_config("tiny", encoder_dims=[64, 96]))
    for p in model.parameters():  # a random model with non-zero adaLN gates, so text matters
        p.data.add_(0.02 * torch.randn_like(p))
    encoders = (EncoderEntry("tiny_llama", EncoderConfig(tiny_llms["tiny-llama"], use_chat_template=False), "float16"),
                EncoderEntry("tiny_qwen2", EncoderConfig(tiny_llms["tiny-qwen2"]), "bfloat16"))
    folder = tmp_path_factory.mktemp("ckpt") / "step_000000"
    info = CheckpointInfo(model.config, encoders, IdentityCodec().config(), (16, 16), {"num_steps": 100})
    save_checkpoint(str(folder), model, model, info)
    return str(folder)


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return TextToImagePipeline.from_checkpoint(checkpoint)


def test_checkpoint_metadata_is_read(pipeline):
    assert pipeline.image_size == (16, 16) and pipeline.schedule.num_steps == 100
    assert pipeline.feature_dtypes == {"tiny_llama": "float16", "tiny_qwen2": "bfloat16"}
    assert pipeline.encode(["a red circle"])[0].states.dtype == torch.float32


def test_generate_is_deterministic_per_seed(pipeline):
    prompts = ["a red circle", "two blue squares"]
    first = pipeline.generate(prompts, seeds=[3, 4], steps=4, guidance=3.0)
    assert first.dtype == torch.uint8 and first.shape == (2, 16, 16, 3)
    assert torch.equal(first, pipeline.generate(prompts, seeds=[3, 4], steps=4, guidance=3.0))
    assert not torch.equal(first[0], pipeline.generate(prompts[:1], seeds=[5], steps=4, guidance=3.0)[0])
    # the image of a seed does not depend on the rest of the batch
    alone = pipeline.generate(prompts[1:], seeds=[4], steps=4, guidance=3.0)
    assert (alone[0].int() - first[1].int()).abs().max() <= 1


def test_the_prompt_changes_the_image(pipeline):
    a, b = pipeline.generate(["a red circle", "a green triangle below a cyan square"], seeds=[7, 7], steps=4)
    assert not torch.equal(a, b)


def test_encode_and_denoise_are_callable_separately(pipeline):
    text = pipeline.encode(["a yellow square"])
    assert [t.states.shape[-1] for t in text] == [64, 96]
    latents = pipeline.denoise(text, [1], steps=3, guidance=2.0, height=32, width=16)
    assert latents.shape == (1, 3, 32, 16)
    assert torch.equal(pipeline.decode(latents), pipeline.generate(["a yellow square"], [1], 3, 2.0, 32, 16))


def test_negative_prompts_replace_the_null_caption(pipeline):
    plain = pipeline.generate(["a red circle"], [0], steps=3, guidance=4.0)
    negative = pipeline.generate(["a red circle"], [0], steps=3, guidance=4.0, negative_prompts=["a blue square"])
    assert not torch.equal(plain, negative)
    with pytest.raises(ValueError, match="negative_prompts"):
        pipeline.generate(["a", "b"], [0, 1], negative_prompts=["c"])


def test_bad_arguments_name_the_field(pipeline):
    with pytest.raises(ValueError, match="seeds"):
        pipeline.generate(["a red circle"], seeds=[1, 2])
    with pytest.raises(ValueError, match="height/width"):
        pipeline.generate(["a red circle"], seeds=[1], height=15, width=16)


def test_encoder_paths_override_the_recorded_paths(checkpoint, tiny_llms, tmp_path):
    moved = tmp_path / "llama-copy"
    shutil.copytree(tiny_llms["tiny-llama"], moved)
    pipe = TextToImagePipeline.from_checkpoint(checkpoint, encoder_paths={"tiny_llama": str(moved)})
    assert pipe.encoders["tiny_llama"].config.path == str(moved)
    with pytest.raises(ValueError, match="tiny_llama.*does not hold the model"):
        TextToImagePipeline.from_checkpoint(checkpoint, encoder_paths={"tiny_llama": tiny_llms["tiny-qwen2"]})
    with pytest.raises(ValueError, match="encoder_paths.nope"):
        TextToImagePipeline.from_checkpoint(checkpoint, encoder_paths={"nope": str(moved)})
