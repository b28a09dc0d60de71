"""`lidit evaluate`: benchmark + probe + public grids for a registered version, recorded in MLflow."""

import json
import uuid

import pytest

from helpers import make_checkpoint
from lidit.jobs.cli import main
from lidit.jobs.evaluate.benchmark import grid, read_prompts
from lidit.jobs.evaluate.driver import evaluate, untrained_checkpoint
from lidit.jobs.evaluate.spec import BenchmarkSpec, EvaluateSpec
from lidit.platform import registry
from lidit.platform.config import LiditError, SpecError, load_spec


@pytest.fixture(scope="module")
def untrained(tiny_llms, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("untrained") / "checkpoint", tiny_llms, image_size=16)


def test_untrained_checkpoint_is_the_same_model_freshly_initialised(untrained, tmp_path):
    """The benchmark's floor: same architecture, encoders, codec and size as the trained checkpoint."""
    from safetensors.torch import load_file

    from lidit.models import read_checkpoint_info

    floor = untrained_checkpoint(untrained, str(tmp_path / "floor"), seed=1, use_collaborative=False)
    trained, fresh = read_checkpoint_info(untrained), read_checkpoint_info(floor)
    assert (fresh.encoders, fresh.codec, fresh.image_size) == (trained.encoders, trained.codec, trained.image_size)
    assert fresh.model.use_collaborative is False and fresh.model.width == trained.model.width
    weights = load_file(f"{floor}/model.safetensors")
    assert not any(k.startswith("collaborative_refiner.") for k in weights)


def test_benchmark_key_names_what_changes_the_scores():
    assert BenchmarkSpec().key() == BenchmarkSpec(batch_size=3).key()
    assert BenchmarkSpec().key() != BenchmarkSpec(steps=10).key()
    assert BenchmarkSpec().key() == BenchmarkSpec(likelihood={"batch_size": 3}).key()
    assert BenchmarkSpec().key() != BenchmarkSpec(likelihood={"pairs": 3}).key()


def test_evaluate_a_registered_version(untrained, mlflow_server, tmp_path):
    name = f"lidit-eval-{uuid.uuid4().hex[:6]}"
    version = registry.register_checkpoint(mlflow_server, untrained, name=name)
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text(json.dumps({"tag": "two_object", "prompt": "a photo of a red circle"}) + "\n"
                       + json.dumps({"tag": "colors", "prompt": "a photo of a blue square"}) + "\n")
    spec = EvaluateSpec(model=f"models:/{name}@candidate", output=str(tmp_path / "out"),
                        benchmark={"prompts": 9, "steps": 2, "batch_size": 5,
                                   "likelihood": {"images": 6, "pairs": 2, "batch_size": 8}},
                        public=[{"name": "geneval", "path": str(prompts), "images_per_prompt": 2}],
                        probe={"pairs": 3}, tracking={"tracking_uri": mlflow_server, "experiment": "eval-test"})
    result = evaluate(spec)

    assert {"color", "shape", "overall", "all_correct"} <= set(result.scores)
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert result.scores["overall"] < 0.2  # an untrained model draws noise, not shapes
    assert len(result.rows) == 9 and {r["kind"] for r in result.rows} <= {"single", "spatial", "count"}
    assert [r["raw"] for r in result.probe] == [0.0, 0.0]
    assert 0.0 <= result.scores["likelihood.overall"] <= 1.0 and "likelihood.color" in result.scores

    tags = registry.get_version(mlflow_server, name, version.version).tags
    assert tags["lidit.eval.benchmark"] == result.benchmark
    assert float(tags["lidit.eval.overall"]) == pytest.approx(result.scores["overall"], abs=1e-6)
    assert float(tags["lidit.eval.likelihood.overall"]) == pytest.approx(result.scores["likelihood.overall"], abs=1e-6)
    assert tags["lidit.eval.run"] == result.run_id

    client = registry.client(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.metrics["benchmark.overall"] == pytest.approx(result.scores["overall"])
    assert "probe.tiny_llama.raw" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"benchmark.json", "benchmark_grid.png", "benchmark_table.json", "probe.json", "likelihood.json",
            "public"} <= artifacts

    out = tmp_path / "out" / f"{name}-v{version.version}" / result.benchmark / "public" / "geneval"
    assert json.loads((out / "00001" / "metadata.jsonl").read_text())["tag"] == "colors"
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert (out / "00000" / "grid.png").is_file() and len((out / "prompts.jsonl").read_text().splitlines()) == 2


def test_grid_lays_out_rows_and_columns():
    import numpy as np

    images = np.ones((2, 3, 4, 4, 3), np.uint8) * 255
    out = grid(images, pad=1)
    assert out.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and out[1, 1, 0] == 255 and out[0, 0, 0] == 64


def test_captioned_grid_puts_each_caption_under_its_image_and_frames_the_verdict():
    import numpy as np

    from lidit.jobs.evaluate.benchmark import captioned_grid

    images = np.zeros((5, 16, 16, 3), np.uint8)
    images[:, 4:12, 4:12] = (50, 90, 235)
    out = captioned_grid(images, ["a blue square"] * 4 + ["a long caption " * 6], [True, False, None, True, False],
                         columns=3, cell=64)
    rows, cols = 2, 3
    assert out.shape[1] == cols * (64 + 4) + 4 and out.shape[0] > rows * (64 + 4)  # 2 rows, room for text
    assert tuple(out[4 + 32, 4 + 32]) == (50, 90, 235)  # image 0 scaled 4x, its centre
    assert tuple(out[3, 4 + 32]) == (30, 160, 60) and tuple(out[3, 4 + 68 + 32]) == (210, 40, 40)  # frames
    assert tuple(out[3, 4 + 2 * 68 + 32]) == (255, 255, 255)  # no verdict, no frame
    below = out[4 + 64 + 2 : 4 + 64 + 14, 4 : 4 + 64]
    assert (below < 128).any()  # caption text under the first image
    assert out.shape[0] > captioned_grid(images[:1], ["a blue square"], columns=3, cell=64).shape[0] * 2 - 10


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SpecError, match="benchmark.steps"):
        load_spec(EvaluateSpec, None, ["model=x", "benchmark.steps=0"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1}) + "\n")
    with pytest.raises(LiditError, match="public.dpg: record 0"):
        read_prompts(EvaluateSpec(model="x", public=[{"name": "dpg", "path": str(bad)}]).public[0])
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--set", "log_to_mlflow=false"]) == 1
    assert "missing: not found" in capsys.readouterr().err
