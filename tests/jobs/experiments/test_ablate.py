"""`lidit ablate`: the paper's encoder variants on one data set and budget, through the real jobs.

End to end on the tiny LLMs: precompute (shared between variants with the same encoder specs), Ray Train,
the benchmark and the probe per variant, one table printed and logged in an `ablation` MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lidit.jobs.cli import main
from lidit.jobs.commands import CONFIGS
from lidit.jobs.experiments.ablate import AblateSpec, Outcome, plan_variants
from lidit.jobs.experiments.ablate_report import findings, paired_bootstrap, table_rows
from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import SpecError, load_spec

PACKAGED = CONFIGS / "ablate.yaml"


def test_variants_follow_the_paper_ladder_one_change_per_step():
    encoders = [EncoderSpec(name="smollm2", path="/m/smollm2"),
                EncoderSpec(name="gemma3", path="/m/gemma3", use_chat_template=False, system_prompt="be brief")]
    plan = plan_variants(load_spec(AblateSpec, PACKAGED), encoders)

    assert [v.id for v in plan] == ["raw-smollm2", "raw-gemma3", "instruction-smollm2", "instruction-gemma3",
                                    "refiner-smollm2", "refiner-gemma3", "collaborative-smollm2-gemma3"]
    raw, instructed = plan[1].encoders[0], plan[3].encoders[0]
    assert (raw.instruction, raw.use_chat_template, raw.system_prompt, raw.layer) == ("", False, None, -3)
    assert instructed == encoders[1]  # + instruction: the encoder exactly as configured
    assert plan[-1].encoders == encoders

    last = plan_variants(load_spec(AblateSpec, PACKAGED, ["raw_layer=-1", "per_llm=[]", "variants=[raw, concat]"]),
                         encoders)
    assert [v.id for v in last] == ["raw-smollm2-gemma3", "concat-smollm2-gemma3"]
    assert [e.layer for e in last[0].encoders] == [-1, -1] and [e.layer for e in last[1].encoders] == [-3, -3]


def test_findings_report_each_step_with_its_spread():
    def outcome(kind, llms, overall, probe=None):
        rows = [{"encoder": n, "raw": 0.0, "refined": probe or 0.0, "fused": probe or 0.0} for n in llms.split("+")]
        return Outcome(f"{kind}-{llms.replace('+', '-')}", kind, llms, [{"overall": v, "color": v} for v in overall],
                       [rows for _ in overall])

    outcomes = [outcome("raw", "a", [0.10, 0.20]), outcome("instruction", "a", [0.30, 0.40]),
                outcome("refiner", "a", [0.35, 0.30], probe=0.2), outcome("collaborative", "a+b", [0.60, 0.50], 0.1)]
    text = "\n".join(findings(outcomes))

    assert "+ instruction for a: overall 0.150 -> 0.350 (gain per seed: +0.200, +0.200)" in text
    assert ("ladder from raw a: + instruction +0.200 (beyond the seed spread); + token refiner -0.025 (within the "
            "seed spread); + collaborative refiner +0.225 (beyond the seed spread) -> strict ordering does not hold") in text
    assert "probe a: raw hidden states change 0 at most" in text and "0.2 (refiner-a), 0.1 (collaborative-a-b)" in text
    row = table_rows(outcomes)[0]
    assert row["overall"] == "0.150 ± 0.050" and row["count"] == "-" and row["probe b raw/refined/fused"] == "-"


def test_paired_bootstrap_resolves_a_real_difference_and_not_noise():
    import random

    rng = random.Random(0)
    kinds = [{"color", "shape"}, {"color", "shape", "count"}, {"color", "shape", "spatial"}]
    layout = [kinds[i % 3] for i in range(90)]
    low = [[{c: rng.random() < 0.5 for c in sorted(cats)} for cats in layout] for _ in range(2)]  # two seeds
    better = [[{c: v or rng.random() < 0.6 for c, v in item.items()} for item in seed] for seed in low]
    delta, lo, hi = paired_bootstrap(low, better)
    assert 0 < lo < delta < hi  # each item only improves: the interval excludes zero
    expected = sum(  # mean over categories of the accuracy gain, averaged over seeds
        sum(sum(i[c] for i in b if c in i) / sum(c in i for i in b) - sum(i[c] for i in a if c in i) / sum(c in i for i in a)
            for c in ("color", "shape", "count", "spatial")) / 4 for a, b in zip(low, better)) / 2
    assert abs(delta - expected) < 1e-9
    noise = [[{c: rng.random() < 0.5 for c in sorted(cats)} for cats in layout[:30]] for _ in range(2)]
    shuffled = [seed[3:] + seed[:3] for seed in noise]  # the same verdicts on other items of the same kind
    delta, lo, hi = paired_bootstrap(noise, shuffled)
    assert lo < 0 < hi and abs(delta) < 1e-12  # equally good variants that differ item by item: not resolved
    assert paired_bootstrap(low, low) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(low, [seed[:-1] for seed in better])


def test_bad_specs_fail_with_the_field_named(tmp_path, capsys):
    with pytest.raises(SpecError, match="seeds"):
        load_spec(AblateSpec, PACKAGED, ["seeds=[]"])
    with pytest.raises(SpecError, match="variants.0"):
        load_spec(AblateSpec, PACKAGED, ["variants=[bigger]"])
    with pytest.raises(SpecError, match="train.model.overrides.use_refiner: set by the job itself"):
        load_spec(AblateSpec, PACKAGED, ["train.model.overrides={use_refiner: false}"])
    with pytest.raises(SpecError, match="benchmark.data_seed/heldout_percent"):
        load_spec(AblateSpec, PACKAGED, ["benchmark.data_seed=3"])
    with pytest.raises(SpecError, match="train.train.steps: Field required"):
        load_spec(AblateSpec, None)  # the budget is the packaged spec's; a spec of its own must give one
    assert main(["ablate", "--set", "train.train.stepz=3"]) == 2
    assert "train.train.stepz: unknown field" in capsys.readouterr().err
    assert main(["ablate", "--encoders", "gpt9", "--workdir", str(tmp_path)]) == 2
    assert "encoders: unknown encoder preset 'gpt9'" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_on_the_tiny_llms_end_to_end(ray_local, mlflow_server, tiny_llms, tmp_path, capsys):
    """+ instruction and the full model over both LLMs (2 training runs, 1 precompute: the instructed features
    are shared) and the floor; the other kinds differ only in the encoder specs and flags the planning test
    checks (raw: no instruction, no chat template), and the real-pair ablation runs them all."""
    from mlflow.tracking import MlflowClient

    spec = {
        "name": "ablation-test", "workdir": str(tmp_path / "work"), "seeds": [0], "per_llm": [],
        "variants": ["instruction", "collaborative"],
        "encoders": [{"name": "tiny_llama", "path": tiny_llms["tiny-llama"], "use_chat_template": False},
                     {"name": "tiny_qwen2", "path": tiny_llms["tiny-qwen2"]}],
        "data": {"train": 64, "shard_size": 64, "image_size": 16},
        "train": {"train": {"steps": 6}, "data": {"batch_size": 16}, "optim": {"lr": 3e-3, "ema_decay": 0.9},
                  "scaling": {"num_workers": 1}, "samples": {"prompts": 0},
                  "checkpoint": {"log_final_to_mlflow": False}},
        "benchmark": {"prompts": 6, "steps": 3, "batch_size": 6, "likelihood": {"images": 6, "pairs": 2}},
        "probe": {"pairs": 4},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "ablate-test"},
    }
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["ablate", str(path)]) == 0
    printed = capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("ablate-test").experiment_id],
                             filter_string="tags.`lidit.run_name` = 'ablation-test'")[0]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "ablation.json", str(tmp_path))).read_text())
    both = "tiny_llama-tiny_qwen2"
    variants = {v["variant"]: v for v in table["variants"]}
    assert list(variants) == [f"instruction-{both}", f"collaborative-{both}", "floor"]
    assert {v["llms"] for v in variants.values()} == {"tiny_llama+tiny_qwen2"}

    # one precompute per distinct encoder set: the instructed features are shared
    datasets = {name: v["runs"][0]["dataset"] for name, v in variants.items() if name != "floor"}
    assert datasets[f"instruction-{both}"] == datasets[f"collaborative-{both}"]
    manifest = json.loads((Path(datasets[f"instruction-{both}"]) / "manifest.json").read_text())
    assert [e["config"]["use_chat_template"] for e in manifest["encoders"]] == [False, True]

    # each variant trained the architecture it names, for the whole budget
    for name, flags in ((f"instruction-{both}", (False, False)), (f"collaborative-{both}", (True, True))):
        checkpoint = Path(variants[name]["runs"][0]["checkpoint"])
        config = yaml.safe_load((checkpoint / "config.yaml").read_text())
        assert (config["model"]["use_refiner"], config["model"]["use_collaborative"]) == flags
        assert checkpoint.name.endswith("06")

    # the probe: raw LLM features never see the last word; a trained refiner makes earlier tokens see it
    for name, v in variants.items():
        assert len(v["probe"][0]) == 2
        for row in v["probe"][0]:
            assert row["raw"] == 0.0, (name, row)
            if v["kind"] == "collaborative":
                assert row["refined"] > 0, (name, row)
            else:  # no refiner (a per-token projection) or an untrained one (zero gates)
                assert row["refined"] == 0.0, (name, row)
        assert all(0.0 <= s <= 1.0 for s in v["scores"][0].values())

    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics[f"collaborative-{both}.overall"] == variants[f"collaborative-{both}"]["scores"][0]["overall"]
    assert metrics[f"instruction-{both}.probe.tiny_qwen2.raw"] == 0.0
    assert 0.0 <= metrics[f"collaborative-{both}.likelihood.overall"] <= 1.0  # the sampling-free score too
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ablation.md", "ablation.json", "ablation_table.json", "evaluations", "spec.yaml"} <= artifacts
    llms = "tiny_llama+tiny_qwen2"
    for label in (f"| + instruction | {llms} |", f"| + collaborative refiner | {llms} |", "| untrained floor |",
                  "(a) probe tiny_qwen2"):
        assert label in printed
