"""The ablation's comparison table, the paper's findings in miniature, and its MLflow run."""

from __future__ import annotations

import json

import numpy as np

from lidit.jobs.evaluate.spec import CATEGORIES, METRICS
from lidit.jobs.experiments.ablate import LABELS, AblateSpec, Outcome


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (with 2 seeds: the distance of either seed from the mean)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _cell(values: list[float]) -> str:
    mean, half = spread(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {half:.3f}"


def paired_bootstrap(low: list[list[dict]], high: list[list[dict]], resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """The difference high - low of the mean-over-categories accuracy (the benchmarks' `overall`), averaged
    over seeds, with its 95 % paired bootstrap interval: both variants are scored on the same items, and
    each resample draws the same items for both and for every seed. `low`/`high`: per seed, per item a
    dict category -> correct (only the categories that apply to the item)."""
    if not low or len(low) != len(high) or any(len(a) != len(b) or not a for a, b in zip(low, high)):
        raise ValueError("paired_bootstrap: both variants need the same items for every seed")
    n = len(low[0])
    weights = np.vstack([np.ones(n), np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), resamples)])

    def overall(per_seed: list[list[dict]]) -> np.ndarray:
        scores = []
        for items in per_seed:
            correct = np.array([[float(i.get(c, 0)) for c in CATEGORIES] for i in items])
            present = np.array([[float(c in i) for c in CATEGORIES] for i in items])
            with np.errstate(invalid="ignore", divide="ignore"):
                accuracy = (weights @ correct) / (weights @ present)
            scores.append(np.nanmean(accuracy, axis=1))
        return np.mean(scores, axis=0)

    delta = overall(high) - overall(low)
    low_ci, high_ci = np.percentile(delta[1:], [2.5, 97.5])
    return float(delta[0]), float(low_ci), float(high_ci)


def probe_means(outcome: Outcome) -> dict[str, dict[str, float]]:
    """LLM -> {raw, refined, fused}: the probe averaged over seeds."""
    out: dict[str, dict[str, float]] = {}
    for rows in outcome.probes:
        for row in rows:
            for key in ("raw", "refined", "fused"):
                if key in row:
                    out.setdefault(row["encoder"], {}).setdefault(key, []).append(row[key])
    return {llm: {k: sum(v) / len(v) for k, v in values.items()} for llm, values in out.items()}


def table_rows(outcomes: list[Outcome]) -> list[dict]:
    """One row per variant: label, LLMs, seeds, category cells and probe cells (strings for the table)."""
    llms = list(dict.fromkeys(n for o in outcomes for n in o.llms.split("+")))
    rows = []
    for o in outcomes:
        row = {"variant": LABELS[o.kind], "LLMs": o.llms, "seeds": str(len(o.scores))}
        for category in METRICS:
            values = [s[category] for s in o.scores if category in s]
            row[category] = _cell(values) if values else "-"
        probe = probe_means(o)
        for llm in llms:
            p = probe.get(llm)
            row[f"probe {llm} raw/refined/fused"] = (
                " / ".join(f"{p[k]:.3g}" for k in ("raw", "refined", "fused") if k in p) if p else "-")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def findings(outcomes: list[Outcome]) -> list[str]:
    """The paper's findings in miniature: (a) the probe per LLM, (b) the instruction's gain per raw row
    (per LLM by default), (c) the ladder raw < + instruction < + refiner < + collaborative from each raw
    row, step by step, with whether each step is beyond the spread over seeds."""
    by_id = {o.variant: o for o in outcomes}
    llms = list(dict.fromkeys(n for o in outcomes if o.kind != "floor" for n in o.llms.split("+")))
    lines = []
    for llm in llms:
        raw = [p[llm]["raw"] for o in outcomes if (p := probe_means(o)).get(llm) and "raw" in p[llm]]
        refined = {o.variant: p[llm]["refined"] for o in outcomes if o.kind in ("refiner", "concat", "collaborative")
                   and (p := probe_means(o)).get(llm) and "refined" in p[llm]}
        if raw:
            lines.append(f"(a) probe {llm}: raw hidden states change {max(raw):.3g} at most (every variant); after "
                         "the token refiner " + (", ".join(f"{v:.3g} ({k})" for k, v in refined.items()) or "n/a"))
    for raw in (o for o in outcomes if o.kind == "raw"):  # one per LLM, or one over all of them
        instructed = by_id.get(raw.variant.replace("raw-", "instruction-", 1))
        if instructed:
            gains = [b["overall"] - a["overall"] for a, b in zip(raw.scores, instructed.scores)]
            lines.append(f"(b) + instruction for {raw.llms}: overall {spread([s['overall'] for s in raw.scores])[0]:.3f}"
                         f" -> {spread([s['overall'] for s in instructed.scores])[0]:.3f} (gain per seed: "
                         + ", ".join(f"{g:+.3f}" for g in gains) + ")")
    for raw in (o for o in outcomes if o.kind == "raw"):
        later = (raw.variant.replace("raw-", f"{kind}-", 1) for kind in ("instruction", "refiner"))
        ladder = [raw, *(by_id[v] for v in later if v in by_id),
                  *(o for o in outcomes if o.kind in ("concat", "collaborative"))]
        if len(ladder) < 2:
            continue
        steps, holds = [], True
        for low, high in zip(ladder, ladder[1:]):
            a, b = [s["overall"] for s in low.scores], [s["overall"] for s in high.scores]
            delta = spread(b)[0] - spread(a)[0]
            holds &= delta > 0
            separated = "beyond the seed spread" if min(b) > max(a) or max(b) < min(a) else "within the seed spread"
            steps.append(f"{LABELS[high.kind]} {delta:+.3f} ({separated}{_intervals(low, high)})")
        verdict = "holds" if holds else "does not hold"
        lines.append(f"(c) ladder from raw {raw.llms}: " + "; ".join(steps) + f" -> strict ordering {verdict}")
    return lines


def _intervals(low: Outcome, high: Outcome) -> str:
    """'; likelihood +0.050 [+0.020, +0.080] resolved; sampled ...' where both have per-item verdicts."""
    out = []
    for score in ("likelihood", "sampled"):
        a, b = ([items[score] for items in o.items] for o in (low, high))
        if a and all(a) and all(b) and len(a) == len(b):
            delta, lo, hi = paired_bootstrap(a, b)
            verdict = "resolved" if lo > 0 or hi < 0 else "unresolved"
            out.append(f"{score} {delta:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}")
    return "".join(f"; {o}" for o in out)


def report(outcomes: list[Outcome]) -> str:
    """The printed (and logged) table with its legend and findings."""
    legend = ("scores: held-out shapes benchmark (sampled checker; likelihood.*: denoising error under the caption vs "
              "one-attribute negatives), mean ± half the range over training seeds; steps of the ladder: the "
              "difference in overall with its 95 % paired bootstrap interval over held-out items (resolved: "
              "it excludes zero); probe: mean relative "
              "change of the earlier caption tokens' features when the last word changes (raw LLM / after its "
              "token refiner / after fusion)")
    return "\n".join([markdown_table(table_rows(outcomes)), "", legend, "", *findings(outcomes)])


def log_ablation(spec: AblateSpec, outcomes: list[Outcome], text: str, extra: dict) -> str:
    """The `ablation` MLflow run: metrics per variant, the table (markdown, JSON, MLflow table) and every
    evaluation's files."""
    from lidit.platform import tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir)
    run_id, _ = tracking.start_run(uri, spec.tracking.experiment, spec.name, tags={"lidit.job": "ablate"})
    tracking.log_spec(uri, run_id, spec)
    metrics = {}
    for o in outcomes:
        for category in METRICS:
            values = [s[category] for s in o.scores if category in s]
            if values:
                metrics[f"{o.variant}.{category}"], metrics[f"{o.variant}.{category}.spread"] = spread(values)
        for llm, probe in probe_means(o).items():
            metrics.update({f"{o.variant}.probe.{llm}.{k}": v for k, v in probe.items()})
    tracking.log_metrics(uri, run_id, metrics, step=0)
    rows = table_rows(outcomes)
    tracking.client(uri).log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "ablation_table.json")
    tracking.log_text(uri, run_id, text + "\n", "ablation.md")
    raw = {"benchmark": spec.benchmark.key(), **extra,
           "variants": [{"variant": o.variant, "kind": o.kind, "llms": o.llms, "scores": o.scores, "probe": o.probes,
                         "runs": o.runs} for o in outcomes]}
    tracking.log_text(uri, run_id, json.dumps(raw, indent=1, default=str), "ablation.json")
    for o in outcomes:
        for run in o.runs:  # local folders: the workdir is local
            tracking.log_artifact(uri, run_id, run["evaluation"], f"evaluations/{run.get('name', 'untrained')}")
    tracking.end_run(uri, run_id)
    return run_id
