"""`lidit bench model` smoke run on the tiny preset (the benchmark itself is not a timed test)."""

import argparse
import json

from lidit.jobs.bench import model as bench_model
from lidit.models.cpu_kernels import kernels_pay


def test_bench_model_prints_a_table_and_json(capsys):
    parser = argparse.ArgumentParser()
    bench_model.add_arguments(parser)
    parser.add_argument("--json", action="store_true")  # `lidit bench` adds it to every benchmark
    args = parser.parse_args(["--preset", "tiny", "--latent-size", "8", "--batch", "2", "--text-len", "6",
                              "--instruction-len", "3", "--warmup", "0", "--steps", "1", "--rounds", "1", "--json"])
    assert bench_model.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert [row["model"] for row in result["rows"]] == ["LiDiT-tiny", "PixArtTransformer2DModel"]
    assert all(row["images_per_s"] > 0 and row["tflops"] > 0 for row in result["rows"])
    assert result["speedup_images_per_s"] > 0 and result["cpu_kernels"] == kernels_pay()
    assert any(line.startswith("LiDiT / peer:") for line in lines)
