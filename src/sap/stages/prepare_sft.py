"""``sap prepare-sft``: teacher trajectories -> step-wise Alpaca samples for LLaMA-Factory.

The paper's rule: a trajectory with N searches gives N+1 samples, one per model action. The
instruction of sample k is the prompt plus the history of actions 1..k-1 with their
``<information>`` blocks; ``input`` is empty; the output is action k.

Two layouts (``sft.prepare.layout``, following ``protocol``):

- ``sap``: every trajectory parsed and validated by :mod:`sap.rules.tags`, filtered, its actions
  re-rendered, the prompt rebuilt from the question (or kept with ``keep_prompt``).
- ``paper``: the paper's scripts byte for byte, quirks included (:func:`paper_samples`). Each
  Alpaca record (``instruction``, ``input``, ``output``) is cut at its ``<information>…</information>``
  blocks; each stripped non-empty segment is one sample's output, with instruction
  ``f"{instruction}\\n\\n{input}\\n"`` plus the segments and blocks before it, verbatim (an
  empty segment is skipped together with the block after it). A file with AFM tags anywhere
  (``<plan>``, ``<reflection>``, ``<wiki_search>``, ``<observation>``) is AFM teacher data and
  first gets what ``afm_mhqa_search.py`` does to every record: tags mapped, adjacent thinks
  merged, the instruction replaced by the Search-R1 instruction. No validation, no filters;
  the data file is written as ``json.dump(samples, indent=2, ensure_ascii=False)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sap.rules.atomic import atomic_write_json, atomic_write_text
from sap.rules.config import ExperimentConfig, PrepareSFTConfig
from sap.rules.errors import RunFailed, SapError
from sap.rules.prompts import AFM_SEARCHR1_INSTRUCTION, build_prompt
from sap.rules.records import read_records
from sap.rules.scoring import f1
from sap.rules.tags import (
    ANSWER,
    SEARCH,
    TEXT,
    THINK,
    afm_to_searchr1,
    has_afm_tags,
    parse,
    render_action,
    render_history,
    split_actions,
    validate,
)
from sap.stages.trajectory_io import Episode, Where, read_episodes

DATA_FILE = "iterative_sft_data.json"
DATASET_INFO_FILE = "dataset_info.json"
REPORT_FILE = "prepare_sft_report.json"
DATASET_NAME = "sap_iterative_sft"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Rejection:
    where: Where
    reason: str
    kind: str  # "malformed" or "filtered"

    def as_dict(self) -> dict[str, Any]:
        return {**self.where.as_dict(), "kind": self.kind, "reason": self.reason}


@dataclass
class PrepareResult:
    samples: list[dict[str, str]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    trajectories_read: int = 0
    trajectories_kept: int = 0
    searches: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    duplicate_samples: int = 0
    layout: str = "sap"
    afm_files: list[str] = field(default_factory=list)

    @property
    def malformed(self) -> list[Rejection]:
        return [r for r in self.rejections if r.kind == "malformed"]


def episode_samples(steps_actions: Sequence, prompt: str) -> list[dict[str, str]]:
    """One Alpaca sample per action: history in the instruction, the action as output."""
    samples = []
    for k, action in enumerate(steps_actions):
        samples.append({"instruction": prompt + render_history(steps_actions[:k]), "input": "", "output": render_action(action)})
    return samples


def search_count(steps: Sequence) -> int:
    """Searches in a parsed trajectory (the ``require_search`` filter; also used by collect)."""
    return sum(1 for s in steps if s.kind == SEARCH)


def rejected_phrase(steps: Sequence, phrases: Sequence[str]) -> str | None:
    """The first of ``phrases`` found (case-insensitive) in the reasoning (think and untagged
    text) of a parsed trajectory (the ``reject_phrases`` filter; also used by collect)."""
    reasoning = " ".join(s.content for s in steps if s.kind in (THINK, TEXT)).lower()
    return next((p for p in phrases if p.lower() in reasoning), None)


def _filter_reason(episode: Episode, steps: Sequence, cfg: PrepareSFTConfig) -> str | None:
    if cfg.require_search and search_count(steps) == 0:
        return "no search (--require-search)"
    if cfg.reject_phrases:
        phrase = rejected_phrase(steps, cfg.reject_phrases)
        if phrase is not None:
            return f"reasoning contains {phrase!r} (--reject-phrase)"
    if cfg.min_f1 is not None and episode.golden_answers:
        answer = next(s.content for s in reversed(steps) if s.kind == ANSWER)
        score = f1(answer, episode.golden_answers)
        if score < cfg.min_f1:
            return f"answer F1 {score:.2f} < {cfg.min_f1} (--min-f1)"
    return None


class PrepareError(SapError, ValueError):
    """Inputs or settings prepare-sft cannot use."""


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input paths with each folder replaced by its ``.json``/``.jsonl`` files (sorted, hidden
    ones and those under hidden folders left out: a downloaded hub dataset's folder works)."""
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix in (".json", ".jsonl") and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise PrepareError(f"{p}: no .json or .jsonl file in this folder")
            out.extend(found)
        else:
            out.append(p)
    return out


# --- the paper's layout (afm_mhqa_search.py + make_iterative_sft_data.py) --------------------

_INFORMATION_BLOCK = re.compile(r"(<information>.*?</information>)", re.DOTALL)


def paper_samples(system: str, user_input: str, output: str) -> list[dict[str, str]]:
    """``make_iterative_sft_data.py``'s split of one record (see the module docstring)."""
    parts = _INFORMATION_BLOCK.split(output)
    history = f"{system}\n\n{user_input}\n"
    samples = []
    for i in range(0, len(parts), 2):
        segment = parts[i].strip()
        if not segment:
            continue
        samples.append({"instruction": history, "input": "", "output": segment})
        history += segment
        if i + 1 < len(parts):
            history += parts[i + 1]
    return samples


def prepare_paper(inputs: Iterable[str | Path], cfg: PrepareSFTConfig, progress: bool = False) -> PrepareResult:
    """The paper's layout, byte for byte (module docstring). Filters are sap's and refused here."""
    used = [
        name
        for name, on in (
            ("min_f1", cfg.min_f1 is not None),
            ("require_search", cfg.require_search),
            ("reject_phrases", bool(cfg.reject_phrases)),
            ("dedupe", cfg.dedupe),
        )
        if on
    ]
    if used:
        raise PrepareError(
            f"sft.prepare.{', sft.prepare.'.join(used)}: the paper's scripts have no filters; unset them, or use sft.prepare.layout: sap"
        )
    result = PrepareResult(layout="paper")
    for path in expand_inputs(inputs):
        records = read_records(
            path,
            PrepareError,
            layout="suffix",
            list_hint="the paper's layout reads a JSON list of Alpaca records (instruction, input, output)",
        )
        afm = any(isinstance(r, dict) and isinstance(r.get("output"), str) and has_afm_tags(r["output"]) for _, r in records)
        if afm:
            result.afm_files.append(str(path))
        for where, r in tqdm(records, desc=f"prepare-sft {path.name}", unit=" traj", disable=not progress):
            result.trajectories_read += 1
            if not isinstance(r, dict):
                result.rejections.append(Rejection(where, f"record is a JSON {type(r).__name__}, expected an object", "malformed"))
                continue
            fields = [r.get("instruction", ""), r.get("input", ""), r.get("output", "")]
            if not all(isinstance(x, str) for x in fields):
                result.rejections.append(Rejection(where, "Alpaca fields 'instruction', 'input', 'output' must be strings", "malformed"))
                continue
            system, user_input, output = fields
            if afm:
                system, output = AFM_SEARCHR1_INSTRUCTION, afm_to_searchr1(output)
            samples = paper_samples(system, user_input, output)
            result.trajectories_kept += 1
            result.searches[len(samples) - 1 if samples else 0] += 1
            result.samples.extend(samples)
    return result


def prepare(
    inputs: Iterable[str | Path], cfg: PrepareSFTConfig, prompt_template: str = "searchr1", progress: bool = False, layout: str = "sap"
) -> PrepareResult:
    """Read every input, split valid trajectories into samples, record every rejection.
    ``layout="paper"``: :func:`prepare_paper`."""
    if layout == "paper":
        return prepare_paper(inputs, cfg, progress)
    inputs = expand_inputs(inputs)
    result = PrepareResult()
    seen_trajectories: dict[str, Where] = {}
    seen_samples: set[str] = set()
    aliases = dict(cfg.tag_aliases)
    for path in inputs:
        for item in tqdm(read_episodes(path), desc=f"prepare-sft {Path(path).name}", unit=" traj", disable=not progress):
            result.trajectories_read += 1
            if item.episode is None:
                result.rejections.append(Rejection(item.where, item.error or "unreadable", "malformed"))
                continue
            ep = item.episode
            parsed = parse(ep.trajectory, aliases)
            for p in parsed.problems:
                if not p.fatal:
                    result.warnings[p.reason] += 1
            reasons = [p.reason for p in parsed.problems if p.fatal] or [p.reason for p in validate(parsed.steps)]
            if reasons:
                result.rejections.append(Rejection(ep.where, "; ".join(reasons), "malformed"))
                continue
            if cfg.keep_prompt and ep.prompt:
                prompt = ep.prompt if ep.prompt.endswith("\n") else ep.prompt + "\n"
            elif ep.question:
                prompt = build_prompt(ep.question, prompt_template)
            else:
                result.rejections.append(
                    Rejection(ep.where, "no question found (need 'question', 'Question: ...' in the prompt, or --keep-prompt)", "malformed")
                )
                continue
            reason = _filter_reason(ep, parsed.steps, cfg)
            if reason:
                result.rejections.append(Rejection(ep.where, reason, "filtered"))
                continue
            if cfg.dedupe:
                key = _digest(prompt, ep.trajectory)
                if key in seen_trajectories:
                    result.rejections.append(Rejection(ep.where, f"duplicate of {seen_trajectories[key]} (--dedupe)", "filtered"))
                    continue
                seen_trajectories[key] = ep.where
            actions = split_actions(parsed.steps)
            result.trajectories_kept += 1
            result.searches[len(actions) - 1] += 1
            for sample in episode_samples(actions, prompt):
                if cfg.dedupe:
                    key = _digest(sample["instruction"], sample["output"])
                    if key in seen_samples:
                        result.duplicate_samples += 1
                        continue
                    seen_samples.add(key)
                result.samples.append(sample)
    return result


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def dataset_info(data_file: str = DATA_FILE, name: str = DATASET_NAME) -> dict[str, Any]:
    """The ``dataset_info.json`` entry LLaMA-Factory reads for Alpaca-format data."""
    return {
        name: {"file_name": data_file, "formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    }


def build_report(result: PrepareResult, inputs: Sequence[str | Path], cfg: PrepareSFTConfig) -> dict[str, Any]:
    kept = result.trajectories_kept
    total_searches = sum(k * v for k, v in result.searches.items())
    return {
        "layout": result.layout,
        "afm_files": result.afm_files,
        "inputs": [str(p) for p in inputs],
        "trajectories_read": result.trajectories_read,
        "trajectories_kept": kept,
        "trajectories_rejected": len(result.rejections),
        "malformed": len(result.malformed),
        "filtered": len(result.rejections) - len(result.malformed),
        "samples_written": len(result.samples),
        "duplicate_samples_dropped": result.duplicate_samples,
        "searches_per_trajectory": {str(k): result.searches[k] for k in sorted(result.searches)},
        "mean_searches": total_searches / kept if kept else 0.0,
        "warnings": dict(sorted(result.warnings.items())),
        "filters": {
            "min_f1": cfg.min_f1,
            "require_search": cfg.require_search,
            "reject_phrases": list(cfg.reject_phrases),
            "dedupe": cfg.dedupe,
        },
        "rejected": [r.as_dict() for r in result.rejections],
    }


def write_outputs(result: PrepareResult, out_dir: str | Path, report: dict[str, Any], write_data: bool = True) -> Path:
    """Write data, dataset_info and report atomically; the report always, the data only
    when ``write_data``."""
    out = Path(out_dir)
    if write_data and result.layout == "paper":  # make_iterative_sft_data.py's bytes
        atomic_write_text(out / DATA_FILE, json.dumps(result.samples, indent=2, ensure_ascii=False))
        atomic_write_json(out / DATASET_INFO_FILE, dataset_info())
    elif write_data:
        atomic_write_json(out / DATA_FILE, result.samples)
        atomic_write_json(out / DATASET_INFO_FILE, dataset_info())
    atomic_write_json(out / REPORT_FILE, report)
    return out


@dataclass
class PrepareOutcome:
    """What ``sap prepare-sft`` did: the samples and rejections, the report and where it wrote."""

    result: PrepareResult
    report: dict[str, Any]
    out_dir: Path

    @property
    def data_file(self) -> Path:
        return self.out_dir / DATA_FILE

    @property
    def report_file(self) -> Path:
        return self.out_dir / REPORT_FILE

    def describe(self) -> str:
        r = self.report
        return (
            f"{r['trajectories_read']} trajectories read, {r['trajectories_kept']} kept, {r['malformed']} malformed, "
            f"{r['filtered']} filtered; {r['samples_written']} samples -> {self.data_file}"
        )


def prepare_sft(
    cfg: ExperimentConfig, out: str | Path | None = None, progress: bool = False, echo: Callable[[str], None] = _stderr
) -> PrepareOutcome:
    """The stage: read ``sft.prepare.inputs``, write data, dataset_info and report into ``out``
    (default ``runs/<experiment>/sft/data``), name the first rejections. ``--strict`` with a
    malformed record, or no sample at all, is a :class:`RunFailed` (the report is still written)."""
    from sap.rules.rundir import record_run

    p = cfg.sft.prepare
    files = list(p.inputs)
    if not files:
        raise PrepareError("no input files: give INPUT paths or set sft.prepare.inputs in the config")
    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        raise PrepareError(f"input file not found: {', '.join(missing)}")
    run_dir = record_run(cfg, "prepare-sft")
    out_dir = Path(out) if out else run_dir / "sft" / "data"
    result = prepare(files, p, cfg.prompt_template, progress=progress, layout=cfg.sft_layout)
    report = build_report(result, files, p)
    failed = p.strict and bool(result.malformed)
    write_outputs(result, out_dir, report, write_data=not failed)
    outcome = PrepareOutcome(result, report, out_dir)
    for r in result.rejections[:20]:
        echo(f"rejected {r.where}: {r.reason}")
    if len(result.rejections) > 20:
        echo(f"... and {len(result.rejections) - 20} more (see {outcome.report_file})")
    if failed:
        raise RunFailed(f"--strict: {len(result.malformed)} malformed record(s); no data written (report: {outcome.report_file})")
    if not result.samples:
        raise RunFailed(f"no samples written: every trajectory was rejected (report: {outcome.report_file})")
    return outcome
