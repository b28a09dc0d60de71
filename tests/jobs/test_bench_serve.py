"""`lidit bench serve` smoke run: both applications on real Ray Serve, real HTTP load from the separate client
process, the table and the JSON line (the benchmark itself is not a timed test)."""

import argparse
import json

import pytest


@pytest.mark.slow
def test_bench_serve_loads_both_apps_and_reports_every_phase(ray_local, tmp_path, capsys):
    from lidit.jobs import bench_serve

    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    # --denoiser-cpus 0: the session's Ray has 2 CPUs, which other tests' actors may hold
    args = parser.parse_args(["--clients", "1,3", "--requests", "6", "--steps", "2", "--size", "16",
                              "--denoiser-cpus", "0", "--workdir", str(tmp_path), "--json"])
    assert bench_serve.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    rows = {(row["mode"], row["clients"]): row for row in result["rows"]}
    assert sorted(rows) == [("batched", 1), ("batched", 3), ("unbatched", 1), ("unbatched", 3)]
    for row in rows.values():
        assert row["requests"] == 6 and row["errors"] == 0 and row["requests_per_s"] > 0
        assert row["p50_ms"] <= row["p99_ms"] and row["batch_mean"] >= 1
    assert all(rows["unbatched", c]["batch_max"] == 1 for c in (1, 3))  # every batch size forced to 1
    assert result["speedup_at_max_clients"] > 0
    assert any(line.startswith("batched / unbatched requests/s at 3 clients:") for line in lines)
