"""``sap report``: every evaluated group of an experiment side by side, as the paper's table
(with the paper's own numbers for reference) plus sap's extra columns, and a bar chart.

Reads ``runs/<exp>/eval/*/metrics.json``; writes ``runs/<exp>/report.md`` and
``runs/<exp>/report.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sap.rules.atomic import atomic_path, atomic_write_text
from sap.rules.config import ExperimentConfig
from sap.rules.errors import SapError

#: Table 3 of the paper (NQ test, 3,610 questions): group -> (configuration, EM, ROUGE-L).
PAPER_TABLE: dict[str, tuple[str, float, float]] = {
    "baseline": ("Baseline (no SFT, no RL)", 0.2374, 0.3179),
    "sft": ("SFT Only", 0.3654, 0.4515),
    "rl": ("RL Only", 0.3108, 0.3906),
    "sft_rl": ("SFT + RL (Ours)", 0.4127, 0.4890),
}
PAPER_ORDER = tuple(PAPER_TABLE)

EXTRA_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("subem", "SubEM", "{:.4f}"),
    ("f1", "F1", "{:.4f}"),
    ("valid_format_rate", "valid format", "{:.3f}"),
    ("mean_searches", "searches/q", "{:.2f}"),
    ("mean_turns", "turns/q", "{:.2f}"),
    ("tokens_per_question", "tokens/q", "{:.1f}"),
    ("questions_per_second", "q/s", "{:.2f}"),
    ("n", "n", "{}"),
)


class ReportError(SapError, ValueError):
    pass


def collect(run_dir: Path) -> dict[str, dict[str, Any]]:
    """group -> metrics, the paper's groups first, then the others by name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            found[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: unreadable metrics ({e})") from None
    ordered = [g for g in PAPER_ORDER if g in found] + sorted(g for g in found if g not in PAPER_TABLE)
    return {g: found[g] for g in ordered}


METRIC_SET_TEXT = {
    "paper": "the paper's metrics (EM and ROUGE-L of its `compute_metrics.py`, as in its table 3)",
    "sap": "sap's metrics (SQuAD EM, as Search-R1's reward; ROUGE-L of the rouge-score package): not the paper's "
    "normalisation, so not directly comparable with its table 3 (run with `protocol: paper` or `eval.metrics: paper`)",
}


def metric_set_of(m: dict[str, Any]) -> str:
    """The metric set a group's metrics.json says it reports (older files: sap's)."""
    return str(m.get("metric_set", "sap"))


def headline(m: dict[str, Any], metric_set: str) -> tuple[float, float]:
    """(EM, ROUGE-L) of a group in the named set; flat keys are sap's (older metrics.json)."""
    values = m.get(metric_set)
    if isinstance(values, dict):
        return float(values["em"]), float(values["rouge_l"])
    if metric_set != "sap":
        raise ReportError(f"group {m.get('group', '?')}: metrics.json has no {metric_set!r} metrics (re-run `sap eval` on it)")
    return float(m["em"]), float(m["rouge_l"])


def short_groups(groups: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for groups evaluated on fewer questions than their dataset has."""
    out = []
    for g, m in groups.items():
        total = m.get("dataset_questions")
        if isinstance(total, int) and m.get("n", total) < total:
            out.append(
                f"`{g}` was evaluated on {m['n']} of the {total} questions of `{m.get('dataset', '?')}` "
                "(eval.limit, or an unfinished run): its scores are not comparable with a full run."
            )
    return out


def failed_searches(m: dict[str, Any]) -> int:
    """Searches of a group's predictions that failed (and got empty results)."""
    return int(m.get("retrieval_failures") or 0)


def failed_search_groups(groups: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for groups whose metrics include failed searches."""
    out = []
    for g, m in groups.items():
        if failed_searches(m):
            total = f" of {m['searches']}" if "searches" in m else ""
            out.append(
                f"`{g}`: {failed_searches(m)}{total} searches failed (the retriever did not answer; the model got an empty "
                "`<information>` block), so its scores understate the model. Fix the retriever and rerun "
                f"`sap eval --group {g}`: the questions whose searches failed are played again."
            )
    return out


def _row_no(group: str, i: int) -> str:
    return str(PAPER_ORDER.index(group) + 1) if group in PAPER_TABLE else f"+{i}"


def markdown(experiment: str, groups: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Evaluation report: {experiment}", ""]
    sets = sorted({metric_set_of(m) for m in groups.values()})
    metric_set = sets[0] if len(sets) == 1 else "sap"
    protocols = sorted({str(m.get("protocol", "sap")) for m in groups.values()})
    datasets = sorted({str(m.get("dataset", "?")) for m in groups.values()})
    lines.append(f"Protocol: {', '.join(f'`{p}`' for p in protocols)}. Metrics: `{metric_set}`, {METRIC_SET_TEXT[metric_set]}.")
    lines.append("")
    lines.append(
        f"Dataset: {', '.join(f'`{d}`' for d in datasets)}. The paper's own numbers (its table 3: NQ test, 3,610 "
        "questions, its metrics) are in the last two columns."
    )
    if len(sets) > 1:
        lines += ["", f"Warning: the groups were evaluated with different metric sets ({', '.join(sets)}); sap's set is shown for all."]
    for w in short_groups(groups) + failed_search_groups(groups):
        lines += ["", f"Warning: {w}"]
    lines.append("")
    em_label, rl_label = ("EM (paper)", "ROUGE-L (paper)") if metric_set == "paper" else ("EM (sap)", "ROUGE-L (sap)")
    head = ["Group", "Configuration", em_label, rl_label, *(label for _, label, _ in EXTRA_COLUMNS), "table 3 EM", "table 3 ROUGE-L"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    extra_i = 0
    for g, m in groups.items():
        if g not in PAPER_TABLE:
            extra_i += 1
        config, p_em, p_rl = PAPER_TABLE.get(g, (g, None, None))
        em, rl = headline(m, metric_set)
        mark = f" **[{failed_searches(m)} failed searches]**" if failed_searches(m) else ""
        cells = [_row_no(g, extra_i), f"{config} (`{g}`: `{m.get('model', '?')}`){mark}", f"{em:.4f}", f"{rl:.4f}"]
        cells += [fmt.format(m[k]) if k in m else "–" for k, _, fmt in EXTRA_COLUMNS]
        cells += [f"{p_em:.4f}" if p_em is not None else "–", f"{p_rl:.4f}" if p_rl is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [g for g in PAPER_ORDER if g not in groups]
    if missing:
        lines += ["", f"Not evaluated yet: {', '.join(f'`{g}`' for g in missing)} (`sap eval --group NAME`)."]
    lines += [
        "",
        "Columns: SubEM and F1 are sap's (SQuAD normalisation); SubEM = a gold answer is contained in the prediction; "
        "valid format = the episode ended with an "
        "`<answer>` and every turn was a search or an answer; searches/q, turns/q and tokens/q (generated tokens) are "
        "means per question; q/s = questions per second of the last `sap eval` run of the group. Both metric sets are "
        "in each group's `metrics.json` (keys `sap` and `paper`).",
        "",
        "![EM and ROUGE-L per group](report.png)",
        "",
    ]
    return "\n".join(lines)


def bar_chart(groups: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(groups)
    ticks = [f"{g}\n({failed_searches(groups[g])} failed searches)" if failed_searches(groups[g]) else g for g in names]
    x = np.arange(len(names))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.2), dpi=120)
    sets = {metric_set_of(groups[g]) for g in names}
    metric_set = sets.pop() if len(sets) == 1 else "sap"
    values = [headline(groups[g], metric_set) for g in names]
    series = [
        (f"EM ({metric_set})", [v[0] for v in values], "#1f77b4", None),
        (f"ROUGE-L ({metric_set})", [v[1] for v in values], "#ff7f0e", None),
        ("table 3 EM", [PAPER_TABLE[g][1] if g in PAPER_TABLE else 0.0 for g in names], "#aec7e8", "//"),
        ("table 3 ROUGE-L", [PAPER_TABLE[g][2] if g in PAPER_TABLE else 0.0 for g in names], "#ffbb78", "//"),
    ]
    for i, (label, values, color, hatch) in enumerate(series):
        bars = ax.bar(x + (i - 1.5) * width, values, width, label=label, color=color, hatch=hatch, edgecolor="white")
        if not label.startswith("table 3"):
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(x, ticks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(ncols=4, fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def write_report(run_dir: Path, experiment: str) -> tuple[Path, Path]:
    groups = collect(run_dir)
    if not groups:
        raise ReportError(f"{run_dir / 'eval'}: no evaluated group (run `sap eval --group NAME` first)")
    from sap.stages.ppo_run import report_section

    md = atomic_write_text(run_dir / "report.md", markdown(experiment, groups) + report_section(run_dir))
    png = bar_chart(groups, run_dir / "report.png", f"{experiment}: EM and ROUGE-L per group")
    return md, png


def report(cfg: ExperimentConfig) -> tuple[Path, Path]:
    """The stage: :func:`write_report` for the config's run, recorded in its manifest."""
    from sap.rules.rundir import record_run

    md, png = write_report(cfg.run_dir, cfg.experiment)
    record_run(cfg, "report")
    return md, png
