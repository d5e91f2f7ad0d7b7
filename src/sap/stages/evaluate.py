"""``sap eval``: run one evaluation group (a model) through the search agent on a dataset.

Writes ``runs/<exp>/eval/<group>/``:

- ``predictions.jsonl``: one line per question, appended (and fsynced) as each finishes;
- ``metrics.json``: both metric sets under their names, ``sap`` (em, subem, f1, rouge_l) and
  ``paper`` (em, rouge_l of ``compute_metrics.py``), ``metric_set`` (the one the report shows,
  from ``eval.metrics``/``protocol``), n and ``dataset_questions`` (the dataset's size: n is
  smaller when ``eval.limit`` cut it), valid_format_rate, mean_searches, mean_turns,
  tokens_per_question, questions_per_second, and more. The flat em/subem/f1/rouge_l keys are
  sap's set (kept for older readers);
- ``settings.json``: what the predictions depend on (model, with the size and mtime of its
  weight and config files when it is a local folder; dataset, decoding, agent).

Re-running resumes: questions already in ``predictions.jsonl`` are skipped, so a crash or
Ctrl-C loses at most the questions in flight and none is duplicated (a question whose searches
failed is played again, and its new line replaces the old one).

Runs that would be meaningless stop early: the retriever's ``/health`` is checked before the
model is loaded, and a run whose share of failed searches passes ``retriever.max_failure_rate``
stops with :class:`sap.rules.errors.RunFailed` (exit 1) after writing what it finished. Resuming with different
settings, or after the model was retrained into the same folder, is refused (``restart=True``,
``sap eval --restart``, starts over).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sap.agent.engines.base import Engine
from sap.agent.loop import AgentSettings, Episode, SearchAgent
from sap.agent.retrieval import RetrieverClient, SearchFailureGuard, require_healthy
from sap.rules.atomic import JsonlAppender, atomic_write_json, read_jsonl
from sap.rules.config import EvalConfig, ExperimentConfig
from sap.rules.errors import Interrupted, SapError
from sap.rules.questions import ANSWER_FIELDS, QUESTION_FIELD, Question, QuestionFileError, read_questions
from sap.rules.rundir import read_settings, settings_changed
from sap.rules.scoring import METRICS, aggregate, paper_aggregate, paper_score, score

PREDICTIONS = "predictions.jsonl"
METRICS_FILE = "metrics.json"
SETTINGS_FILE = "settings.json"


class EvalError(SapError, ValueError):
    """Bad dataset, group or run state; the message names the file/field."""


# --- datasets ------------------------------------------------------------------------------


def load_questions(
    path: str | Path,
    limit: int | None = None,
    question_field: str = QUESTION_FIELD,
    answer_fields: Sequence[str] = ANSWER_FIELDS,
) -> list[Question]:
    """:func:`sap.rules.questions.read_questions` (JSONL or Search-R1 parquet; a question's id
    is its 0-based position), with its errors as :class:`EvalError`."""
    try:
        return read_questions(path, limit, question_field=question_field, answer_fields=answer_fields)
    except QuestionFileError as e:
        raise EvalError(str(e)) from None


# --- one group -----------------------------------------------------------------------------


def agent_settings(cfg: ExperimentConfig) -> AgentSettings:
    return AgentSettings.from_section(cfg.eval, cfg.retriever.topk, cfg.prompt_template, loop=cfg.eval_loop)


def group_model(cfg: ExperimentConfig, group: str) -> str:
    if group not in cfg.eval.groups:
        raise EvalError(f"unknown eval group {group!r}; configured: {', '.join(cfg.eval.groups) or 'none'}")
    return cfg.expand(cfg.eval.groups[group].model)


MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer_config.json", "*.safetensors", "*.bin")
"""The files of a model folder whose identity the settings record: the weights, the config,
and what sets the chat template and the stop tokens."""


def model_identity(model: str) -> dict[str, dict[str, int]] | None:
    """A cheap identity of a local model folder: size and ``mtime_ns`` of each file matching
    :data:`MODEL_FILE_PATTERNS` (nothing is read, so gigabytes cost nothing). Retraining into the
    same folder rewrites them and so changes it. None for a hub id (not a local folder): its
    name is all there is."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    out: dict[str, dict[str, int]] = {}
    for pattern in MODEL_FILE_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            if f.is_file() and f.name not in out:
                st = f.stat()
                out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return dict(sorted(out.items()))


def settings_fingerprint(cfg: ExperimentConfig, group: str, engine: str) -> dict[str, Any]:
    """What predictions depend on; a resumed run must match it (``limit`` may change)."""
    model = group_model(cfg, group)
    return {
        "group": group,
        "model": model,
        "model_files": model_identity(model),
        "dataset": cfg.eval.dataset,
        "engine": engine,
        "agent": asdict(agent_settings(cfg)) | {"max_in_flight": None},
        "retriever": {"topk": cfg.retriever.topk},  # not the URL: a restarted server may move
        "max_model_len": cfg.eval.max_model_len,
    }


def compute_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of predictions records (scores recomputed from prediction and gold)."""
    n = len(records)
    out: dict[str, Any] = dict(aggregate(score(r["prediction"], r["golden_answers"]) for r in records))
    out["sap"] = {m: out[m] for m in METRICS}
    paper = paper_aggregate(paper_score(r["prediction"], r["golden_answers"]) for r in records)
    out["paper"] = {"em": paper["em"] or 0.0, "rouge_l": paper["rouge_l"] or 0.0}

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in records) / n if n else 0.0

    out.update(
        valid_format_rate=mean("valid_format"),
        mean_searches=mean("searches"),
        mean_turns=mean("turns"),
        tokens_per_question=mean("tokens_generated"),
        searches=int(sum(r.get("searches", 0) for r in records)),
        retrieval_failures=int(sum(r.get("retrieval_failures", 0) for r in records)),
        answered_rate=sum(1 for r in records if r["prediction"]) / n if n else 0.0,
        stop_reasons=dict(Counter(r.get("stop_reason") for r in records)),
    )
    return out


def _check_settings(group_dir: Path, fingerprint: dict[str, Any]) -> None:
    old = read_settings(group_dir / SETTINGS_FILE)
    if old is None:
        return
    if isinstance(old.get("agent"), dict):  # written before eval.loop existed: the sap loop
        old["agent"].setdefault("loop", "sap")
    if "model_files" not in old:  # written before sap recorded the model's files: cannot tell
        old = old | {"model_files": fingerprint.get("model_files")}
    diff = settings_changed(old, fingerprint)
    if not diff:
        return
    if diff == ["model_files"]:  # same folder, other files: retrained (or replaced) in place
        before, now = old.get("model_files") or {}, fingerprint.get("model_files") or {}
        changed = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
        reason = (
            f"the model in {fingerprint.get('model')} changed since the earlier predictions were made "
            f"({', '.join(changed)} rewritten, added or removed): they are not this model's"
        )
    else:
        reason = f"earlier predictions were made with different settings ({', '.join(diff)})"
    raise EvalError(
        f"{group_dir}: {reason}; rerun with --restart to start this group over "
        "(its predictions are discarded), or restore the earlier model and settings"
    )


def evaluate_group(
    cfg: ExperimentConfig,
    group: str,
    *,
    engine: Engine | None = None,
    engine_name: str | None = None,
    retriever: RetrieverClient | None = None,
    restart: bool = False,
    progress: bool = False,
    on_episode: Callable[[Episode], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``group`` (resuming), write its files and return its metrics. ``engine``
    overrides the configured one (tests pass a scripted engine)."""
    e: EvalConfig = cfg.eval
    engine_name = engine_name or ("custom" if engine is not None else e.engine)
    group_dir = cfg.run_dir / "eval" / group
    model = group_model(cfg, group)
    fingerprint = settings_fingerprint(cfg, group, engine_name)
    all_questions = load_questions(e.dataset, None, e.question_field, e.answer_fields)
    questions = all_questions[: e.limit] if e.limit is not None else all_questions
    pred_path = group_dir / PREDICTIONS
    if restart:
        for name in (PREDICTIONS, METRICS_FILE, SETTINGS_FILE):
            (group_dir / name).unlink(missing_ok=True)
    _check_settings(group_dir, fingerprint)
    group_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(group_dir / SETTINGS_FILE, fingerprint)

    wanted = {q.id for q in questions}
    done: dict[str, dict[str, Any]] = {}
    if pred_path.exists():
        with JsonlAppender(pred_path):  # cuts a torn last line left by a crash
            pass
        for r in read_jsonl(pred_path):
            done[str(r["id"])] = r  # a question played again after failed searches: its last line
    todo = [q for q in questions if q.id not in done or done[q.id].get("retrieval_failures")]

    elapsed = 0.0
    n_new = 0
    guard = SearchFailureGuard(cfg.retriever.max_failure_rate)
    if todo:
        retriever = retriever or RetrieverClient.from_config(cfg.retriever)
        require_healthy(cfg.retriever, retriever)  # before loading a model
        if engine is None:
            from sap.agent.engines import build_engine

            engine = build_engine(e.engine, model, e)
        agent = SearchAgent(engine, retriever, agent_settings(cfg))
        bar = _progress(len(questions), len(done), group, progress)
        em_sum = sum(r.get("em", 0.0) for r in done.values() if r["id"] in wanted)
        t0 = time.perf_counter()
        try:
            with JsonlAppender(pred_path) as out:
                for ep in agent.run(todo):
                    rec = ep.record()
                    rec.update(score(rec["prediction"], rec["golden_answers"]).as_dict())
                    rec.update({f"paper_{k}": v for k, v in paper_score(rec["prediction"], rec["golden_answers"]).as_dict().items()})
                    out.write(rec)
                    done[rec["id"]] = rec
                    n_new += 1
                    em_sum += rec["em"]
                    guard.add(rec["searches"], rec["retrieval_failures"])
                    if on_episode is not None:
                        on_episode(ep)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(em=f"{em_sum / max(1, len(done)):.3f}")
                    if guard.exceeded:
                        break
        finally:
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.close()

    records = [done[q.id] for q in questions if q.id in done]
    metrics = compute_metrics(records)
    metrics.update(
        questions_per_second=(n_new / elapsed) if n_new and elapsed > 0 else _previous_qps(group_dir),
        group=group,
        model=model,
        engine=engine_name,
        dataset=e.dataset,
        dataset_questions=len(all_questions),
        protocol=cfg.protocol,
        metric_set=cfg.metric_set,
        new_this_run=n_new,
        wall_s_this_run=round(elapsed, 3),
    )
    atomic_write_json(group_dir / METRICS_FILE, metrics)
    guard.check(
        retriever.base_url if retriever is not None else cfg.retriever.url,
        f"The {len(records)} finished questions are kept in {pred_path}.",
    )
    return metrics


def _previous_qps(group_dir: Path) -> float:
    try:
        return float(json.loads((group_dir / METRICS_FILE).read_text(encoding="utf-8"))["questions_per_second"])
    except (OSError, ValueError, KeyError):
        return 0.0


def _progress(total: int, initial: int, group: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"eval {group}", unit="q", dynamic_ncols=True)


def resolve_groups(cfg: ExperimentConfig, names: Iterable[str]) -> list[str]:
    """``all`` -> every configured group; unknown names are errors."""
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(g for g in cfg.eval.groups if g not in out)
        elif name not in cfg.eval.groups:
            raise EvalError(f"unknown eval group {name!r}; configured: {', '.join(cfg.eval.groups)} (or 'all')")
        elif name not in out:
            out.append(name)
    return out


def describe_group(cfg: ExperimentConfig, name: str, m: dict[str, Any]) -> str:
    """One line per evaluated group (and a warning line when searches failed)."""
    line = (
        f"{name}: n={m['n']} sap EM={m['em']:.4f} ROUGE-L={m['rouge_l']:.4f} "
        f"paper EM={m['paper']['em']:.4f} ROUGE-L={m['paper']['rouge_l']:.4f} valid={m['valid_format_rate']:.3f} "
        f"searches/q={m['mean_searches']:.2f} q/s={m['questions_per_second']:.2f} -> {cfg.run_dir / 'eval' / name}"
    )
    if m["retrieval_failures"]:
        line += f"\nwarning: {m['retrieval_failures']} search(es) failed and got empty results"
    return line


def evaluate(
    cfg: ExperimentConfig,
    groups: Iterable[str],
    *,
    restart: bool = False,
    progress: bool = False,
    on_group: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The stage: every named group (``all`` = each configured one) in turn, resuming; metrics
    logged to the tracker, and ``on_group`` gets :func:`describe_group`'s line as each finishes. Ctrl-C keeps the
    finished questions (:class:`~sap.rules.errors.Interrupted`, exit 130)."""
    from sap.rules.rundir import record_run
    from sap.tracking import log_metrics

    names = resolve_groups(cfg, groups)
    record_run(cfg, "eval")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            metrics = evaluate_group(cfg, name, restart=restart, progress=progress)
        except KeyboardInterrupt:
            where = cfg.run_dir / "eval" / name
            raise Interrupted(f"interrupted: finished questions are kept in {where}; rerun the same command to resume") from None
        log_metrics(cfg, f"eval/{name}", metrics)
        results[name] = metrics
        if on_group is not None:
            on_group(describe_group(cfg, name, metrics))
    return results


__all__ = [
    "METRICS",
    "EvalError",
    "compute_metrics",
    "evaluate",
    "evaluate_group",
    "load_questions",
    "model_identity",
    "resolve_groups",
    "settings_fingerprint",
]
