"""The HTTP contract of `lidit serve` on its own: every bad input class gets its 4xx and a one-line message
naming the field; good input gets its defaults. (The same classes go through real HTTP in test_serve.py.)"""

from __future__ import annotations

import pytest

from lidit.jobs.serve.api import (MAX_SEED, ApiError, ImageShape, check_bearer, describe_limits, parse_json,
                                  token_digest, validate_request)
from lidit.jobs.serve.spec import LimitsSpec, ServeSpec
from lidit.platform.config import SpecError, load_spec

LIMITS = LimitsSpec(max_n=4, min_size=16, max_size=64, max_steps=30, default_steps=10, max_guidance=10.0,
                    default_guidance=3.0, max_prompt_chars=50)
SHAPE = ImageShape(size_multiple=8, default_height=24, default_width=32)


def error(body: bytes | dict) -> ApiError:
    with pytest.raises(ApiError) as caught:
        data = parse_json(body, 1000) if isinstance(body, bytes) else body
        validate_request(data, LIMITS, SHAPE, random_seed=7)
    return caught.value


def test_defaults_come_from_the_model_and_the_spec():
    gen = validate_request({"prompt": "  a red circle "}, LIMITS, SHAPE, random_seed=7)
    assert (gen.prompt, gen.n, gen.width, gen.height, gen.steps, gen.guidance, gen.seed) == (
        "a red circle", 1, 32, 24, 10, 3.0, 7)
    assert gen.response_format == "png" and gen.negative_prompt is None
    gen = validate_request({"prompt": "x", "n": 3, "seed": 5, "guidance": 1, "response_format": "b64_json",
                            "negative_prompt": "blurry"}, LIMITS, SHAPE, random_seed=7)
    assert gen.seeds == [5, 6, 7] and gen.guidance == 1.0 and gen.negative_prompt == "blurry"
    reported = describe_limits(LIMITS, SHAPE)
    assert (reported["max_size"], reported["size_multiple"], reported["default_width"]) == (64, 8, 32)


@pytest.mark.parametrize("body, status, field", [
    (b"{", 400, "body"),
    (b"", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b'{"prompt": "x", "guidance": NaN}', 400, "body"),
    (b"x" * 1001, 413, "body"),
    ({}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x" * 51}, 422, "prompt"),
    ({"prompt": 3}, 422, "prompt"),
    ({"prompt": "x", "steps": "10"}, 422, "steps"),
    ({"prompt": "x", "steps": 10.0}, 422, "steps"),
    ({"prompt": "x", "steps": True}, 422, "steps"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "steps": 31}, 422, "steps"),
    ({"prompt": "x", "n": 5, "response_format": "b64_json"}, 422, "n"),
    ({"prompt": "x", "n": 2}, 422, "n"),
    ({"prompt": "x", "width": 8}, 422, "width"),
    ({"prompt": "x", "height": 72}, 422, "height"),
    ({"prompt": "x", "width": 36}, 422, "width"),
    ({"prompt": "x", "guidance": 11}, 422, "guidance"),
    ({"prompt": "x", "guidance": "high"}, 422, "guidance"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": MAX_SEED}, 422, "seed"),
    ({"prompt": "x", "response_format": "jpeg"}, 422, "response_format"),
    ({"prompt": "x", "negative_prompt": ["a"]}, 422, "negative_prompt"),
    ({"prompt": "x", "model": "dall-e"}, 422, "model"),
])
def test_every_bad_input_class_gets_its_4xx_naming_the_field(body, status, field):
    err = error(body)
    assert (err.status, err.field) == (status, field)
    assert err.message.startswith(f"{field}:") and "\n" not in err.message
    assert err.body() == {"error": {"message": err.message, "field": field, "type": err.kind}}


def test_multiple_of_the_patch_size_is_explained():
    assert "multiple of 8" in error({"prompt": "x", "width": 36}).message


def test_bearer_token_is_checked_against_its_digest_only():
    digest = token_digest("s3cret")
    check_bearer(None, None)  # auth off: anything goes
    check_bearer("Bearer s3cret", digest)
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong"):
        with pytest.raises(ApiError) as caught:
            check_bearer(header, digest)
        assert caught.value.status == 401 and caught.value.field == "authorization"
    assert "s3cret" not in digest


def test_serve_spec_rejects_what_serve_would_choke_on(tmp_path):
    spec = load_spec(ServeSpec)
    assert spec.host == "127.0.0.1" and spec.model == "models:/lidit@champion"
    with pytest.raises(SpecError, match="max_ongoing_requests"):
        load_spec(ServeSpec, None, ["denoiser.max_batch_size=8", "denoiser.max_ongoing_requests=4"])
    with pytest.raises(SpecError, match="limits.max_n"):
        load_spec(ServeSpec, None, ["limits.max_n=32"])
    with pytest.raises(SpecError, match="model: models:/lidit: expected models:/NAME@ALIAS"):
        load_spec(ServeSpec, None, ["model=models:/lidit"])
    with pytest.raises(SpecError, match="encoder.num_gpus"):
        load_spec(ServeSpec, None, ["encoder.num_gpus=-1"])
