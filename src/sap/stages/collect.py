"""``sap collect``: teacher trajectories on training questions, filtered the Always-Search way.

The teacher (a local model through sap's engines, or an OpenAI-compatible chat endpoint) plays
the shared agent loop (:class:`sap.agent.loop.SearchAgent`: the same prompt, tags, retriever and
observations as the student) on ``collect.dataset``, ``collect.samples_per_question`` times per
question. Writes into ``collect.out`` (default ``runs/<exp>/collect/``):

- ``samples.jsonl``: every sample, appended (fsynced) as it finishes: kept, rejected (with each
  filter's verdict and reason) or failed (the teacher or the retriever kept failing);
- ``trajectories.jsonl``: the kept ones, in question order, in the shape ``sap prepare-sft``
  reads as is (``question``, ``golden_answers``, ``trajectory``, plus ``teacher``, ``sample``
  and ``stats``);
- ``collect_report.json``: counts, kept per filter, searches, tokens, cost, throughput;
- ``settings.json``: what the samples depend on.

Re-running resumes: finished samples are skipped (failed ones are tried again), so a crash
loses at most the samples in flight and none is duplicated. The filters are applied again to
every sample at the end of each run, so changing them needs no new generation. Changing what
generation depends on is refused (``restart=True`` / ``--restart`` starts over).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sap.agent.engines.base import Engine
from sap.agent.loop import AgentSettings, Episode, SearchAgent
from sap.agent.retrieval import RetrieverClient, SearchFailureGuard, require_healthy
from sap.rules.atomic import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl
from sap.rules.config import CollectFiltersConfig, ExperimentConfig
from sap.rules.errors import RunFailed, SapError
from sap.rules.questions import Question, QuestionFileError, read_questions
from sap.rules.rundir import read_settings, settings_changed
from sap.rules.scoring import f1
from sap.rules.tags import ANSWER, SEARCH, parse, validate, without_invalid_messages
from sap.stages.prepare_sft import rejected_phrase

SAMPLES = "samples.jsonl"
TRAJECTORIES = "trajectories.jsonl"
REPORT = "collect_report.json"
SETTINGS = "settings.json"
TEACHER_MIN_SAMPLES = 50
"""``collect.teacher.max_failure_rate`` is taken over at least this many samples."""
FILTERS = ("min_f1", "require_search", "always_search", "reject_phrases", "valid_format")
"""Filter names, in the order their verdicts are recorded."""


class CollectError(SapError, ValueError):
    """Bad dataset, teacher or run state; the message names the file or key and the fix."""


@dataclass
class CollectResult:
    out_dir: Path
    report: dict[str, Any]
    new_this_run: int = 0
    paths: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        r = self.report
        return (
            f"{r['samples_done']}/{r['samples_planned']} samples ({r['this_run']['new_samples']} new), "
            f"{r['kept']} kept ({r['keep_rate']:.0%} of {r['samples_ok']}), {r['failed']} failed, {r['mean_searches']:.2f} searches/sample"
            + (f", ~${r['cost']['usd']:.2f}" if r["cost"] else "")
            + f" -> {r['outputs']['trajectories']}"
        )


def run_collect(
    cfg: ExperimentConfig, out_dir: str | Path | None = None, *, restart: bool = False, progress: bool = False
) -> CollectResult:
    """``sap collect``: :func:`collect`, recorded in the run's manifest; a run in which every
    sample failed is a :class:`~sap.rules.errors.RunFailed`."""
    from sap.rules.rundir import record_run

    record_run(cfg, "collect")
    result = collect(cfg, out_dir, restart=restart, progress=progress)
    r = result.report
    if r["samples_done"] and not r["samples_ok"]:
        raise RunFailed(f"{result.describe()}\nevery sample failed ({r['failure_reasons']}); see {r['outputs']['samples']}")
    return result


# --- settings ------------------------------------------------------------------------------


def agent_settings(cfg: ExperimentConfig) -> AgentSettings:
    return AgentSettings.from_section(cfg.collect, cfg.retriever.topk, cfg.prompt_template)


def teacher_name(cfg: ExperimentConfig) -> dict[str, str]:
    t = cfg.collect.teacher
    return {"engine": t.engine, "model": t.model}


def settings_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the samples depend on; a resumed run must match it (``limit`` and
    ``samples_per_question`` may change, the filters too: they are re-applied)."""
    from sap.stages.evaluate import model_identity

    c, t = cfg.collect, cfg.collect.teacher
    teacher: dict[str, Any] = {"engine": t.engine, "model": t.model}
    if t.engine == "openai":
        teacher.update(system_prompt=t.system_prompt, observation_role=t.observation_role, send_stop=t.send_stop, extra_body=t.extra_body)
    else:
        teacher.update(model_files=model_identity(t.model), max_model_len=c.max_model_len)
    return {
        "teacher": teacher,
        "dataset": c.dataset,
        "question_field": c.question_field,
        "answer_fields": list(c.answer_fields),
        "agent": asdict(agent_settings(cfg)) | {"max_in_flight": None},
        "retriever": {"topk": cfg.retriever.topk},
    }


def _check_settings(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    path = out_dir / SETTINGS
    old = read_settings(path)
    diff = settings_changed(old, fingerprint) if old is not None else []
    if diff:
        raise CollectError(
            f"{out_dir}: earlier samples were collected with different settings ({', '.join(diff)}; see {path}); "
            "rerun with --restart to start over (the samples are discarded), use another --out, or restore the settings"
        )


# --- the filters ---------------------------------------------------------------------------

_INFORMATION_RE = re.compile(r"<information>.*?</information>", re.DOTALL)


def teacher_text(trajectory: str) -> str:
    """What the teacher wrote: the trajectory without the observations the environment added."""
    return _INFORMATION_RE.sub(" ", without_invalid_messages(trajectory))


def judge(record: dict[str, Any], filters: CollectFiltersConfig) -> dict[str, dict[str, Any]]:
    """Each configured filter's verdict on one finished sample: ``{name: {"passed", "reason"}}``
    (filters that are off are absent)."""
    out: dict[str, dict[str, Any]] = {}

    def verdict(name: str, passed: bool, reason: str) -> None:
        out[name] = {"passed": passed, "reason": None if passed else reason}

    stats = record["stats"]
    text = teacher_text(record["trajectory"])
    parsed = parse(record["trajectory"])
    if filters.min_f1 is not None:
        score = f1(record["prediction"], record["golden_answers"])
        verdict("min_f1", score >= filters.min_f1, f"answer F1 {score:.2f} < {filters.min_f1}")
    if filters.require_search:
        verdict("require_search", stats["searches"] > 0, "no search")
    if filters.always_search:
        first_search, first_answer = text.find(f"<{SEARCH}>"), text.find(f"<{ANSWER}>")
        if first_search < 0:
            verdict("always_search", False, "answered without searching")
        else:
            verdict("always_search", first_answer < 0 or first_search < first_answer, "an <answer> before the first search")
    if filters.reject_phrases:
        if parsed.ok:
            phrase = rejected_phrase(parsed.steps, filters.reject_phrases)
        else:
            phrase = next((p for p in filters.reject_phrases if p.lower() in text.lower()), None)
        verdict("reject_phrases", phrase is None, f"reasoning contains {phrase!r}")
    if filters.valid_format:
        problems = [p.reason for p in parsed.problems if p.fatal] or [p.reason for p in validate(parsed.steps)]
        if not stats["valid_format"]:
            reason = (
                f"stopped by {stats['stop_reason']}" if stats["stop_reason"] != "answer" else "a turn with neither a search nor an answer"
            )
            verdict("valid_format", False, reason)
        else:
            verdict("valid_format", not problems, "; ".join(problems))
    return out


def apply_filters(record: dict[str, Any], filters: CollectFiltersConfig) -> dict[str, Any]:
    """``record`` with ``filters``, ``kept`` and ``rejected_by`` (re)computed."""
    if record["status"] != "ok":
        return record | {"filters": {}, "kept": False, "rejected_by": ["failed"]}
    verdicts = judge(record, filters)
    rejected = [name for name in FILTERS if name in verdicts and not verdicts[name]["passed"]]
    return record | {"filters": verdicts, "kept": not rejected, "rejected_by": rejected}


# --- samples -------------------------------------------------------------------------------


def plan(questions: Sequence[Question], samples_per_question: int) -> list[Question]:
    """One agent question per (question, sample): id ``{question id}/{sample}``."""
    return [
        Question(f"{q.id}/{k}", q.question, q.golden_answers, {**q.meta, "question_id": q.id, "sample": k})
        for q in questions
        for k in range(samples_per_question)
    ]


def sample_record(ep: Episode, teacher: dict[str, str]) -> dict[str, Any]:
    """The line of ``samples.jsonl`` for a finished episode (filters not applied yet)."""
    q = ep.question
    error = q.meta.get("engine_error")
    if error is None and ep.retrieval_failures:
        error = f"retriever failed on {ep.retrieval_failures} search(es): {'; '.join(q.meta.get('retrieval_errors', []))[:300]}"
    return {
        "id": q.id,
        "question_id": q.meta["question_id"],
        "sample": q.meta["sample"],
        **({"source_id": q.meta["source_id"]} if "source_id" in q.meta else {}),
        "question": q.question,
        "golden_answers": q.golden_answers,
        "trajectory": ep.response,
        "prediction": ep.prediction,
        "teacher": teacher,
        "status": "failed" if error else "ok",
        **({"error": error} if error else {}),
        "stats": {
            "searches": len(ep.queries),
            "queries": ep.queries,
            "turns": len(ep.turns),
            "actions": [t.action for t in ep.turns],
            "stop_reason": ep.stop_reason,
            "valid_format": ep.valid_format,
            "completion_tokens": ep.tokens_generated,
            "prompt_tokens": sum(t.prompt_tokens for t in ep.turns),
            "retrieval_failures": ep.retrieval_failures,
            "latency_s": round(ep.latency_s, 4),
        },
    }


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each sample id (a retried failed sample supersedes its failure)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        with JsonlAppender(path):  # cuts a torn last line left by a crash
            pass
        for r in read_jsonl(path):
            done[str(r["id"])] = r
    return done


# --- the stage -----------------------------------------------------------------------------


def build_teacher(cfg: ExperimentConfig) -> Engine:
    """The configured teacher engine; an endpoint is checked (reachable, key, model) first."""
    t, c = cfg.collect.teacher, cfg.collect
    if t.engine == "openai":
        from sap.agent.engines.openai_chat import OpenAIChatEngine

        engine = OpenAIChatEngine.from_config(t)
        engine.check()
        return engine
    from sap.agent.engines import build_engine

    if not Path(t.model).exists() and t.model.startswith((".", "/", "~")):
        raise CollectError(f"collect.teacher.model: no model at {t.model} (a local folder, or a hub id the machine can reach)")
    return build_engine(
        t.engine, t.model, cfg.eval.model_copy(update={"max_model_len": c.max_model_len, "max_in_flight": c.max_in_flight, "seed": c.seed})
    )


def collect(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    *,
    engine: Engine | None = None,
    retriever: RetrieverClient | None = None,
    restart: bool = False,
    progress: bool = False,
) -> CollectResult:
    """Collect (resuming), write the outputs and return the report. ``engine`` overrides the
    configured teacher (tests pass a scripted one)."""
    c = cfg.collect
    out = Path(out_dir) if out_dir is not None else Path(cfg.expand(c.out))
    try:
        questions = read_questions(c.dataset, c.limit, question_field=c.question_field, answer_fields=c.answer_fields)
    except QuestionFileError as e:
        raise CollectError(f"collect.dataset: {e}") from None
    planned = plan(questions, c.samples_per_question)
    samples_path = out / SAMPLES
    if restart:
        for name in (SAMPLES, TRAJECTORIES, REPORT, SETTINGS):
            (out / name).unlink(missing_ok=True)
    fingerprint = settings_fingerprint(cfg)
    _check_settings(out, fingerprint)
    out.mkdir(parents=True, exist_ok=True)

    done = _read_done(samples_path)
    todo = [q for q in planned if q.id not in done or done[q.id]["status"] != "ok"]
    teacher = teacher_name(cfg)
    run = {"new_samples": 0, "wall_s": 0.0, "completion_tokens": 0, "endpoint": None}
    if not todo:
        report = _finish(cfg, out, planned, done, teacher, run)
        return CollectResult(out, report, 0, _paths(out))
    retriever = retriever or RetrieverClient.from_config(cfg.retriever)
    require_healthy(cfg.retriever, retriever)  # before loading or calling a teacher
    guard = SearchFailureGuard(cfg.retriever.max_failure_rate)
    own_engine = engine is None
    engine = engine or build_teacher(cfg)
    wanted = {q.id for q in planned}
    kept = sum(1 for r in done.values() if r["id"] in wanted and apply_filters(r, c.filters)["kept"])
    finished = sum(1 for r in done.values() if r["id"] in wanted and r["status"] == "ok")
    failed = teacher_failed = 0
    bar = _progress(len(planned), finished, progress)
    t0 = time.perf_counter()
    try:
        atomic_write_json(out / SETTINGS, fingerprint)  # once the teacher and the retriever answer
        agent = SearchAgent(engine, retriever, agent_settings(cfg))
        with JsonlAppender(samples_path) as log:
            for ep in agent.run(todo):
                rec = apply_filters(sample_record(ep, teacher), c.filters)
                log.write(rec)
                done[rec["id"]] = rec
                run["new_samples"] += 1
                run["completion_tokens"] += rec["stats"]["completion_tokens"]
                finished += rec["status"] == "ok"
                failed += rec["status"] != "ok"
                kept += rec["kept"]
                guard.add(rec["stats"]["searches"], rec["stats"]["retrieval_failures"])
                teacher_failed += rec["status"] != "ok" and _failure_kind(rec) == "teacher"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(keep=f"{kept / max(1, finished + failed):.2f}", kept=kept, failed=failed)
                if guard.exceeded or teacher_failed > c.teacher.max_failure_rate * max(run["new_samples"], TEACHER_MIN_SAMPLES):
                    break
    finally:
        run["wall_s"] = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        usage = getattr(engine, "usage", None)
        run["endpoint"] = usage.as_dict() if usage is not None else None
        try:
            done = _read_done(samples_path)  # also after Ctrl-C (even between a write and its count): outputs match the log
            report = _finish(cfg, out, planned, done, teacher, run)
        finally:
            if own_engine:  # after the outputs: nothing in the engine's shutdown can lose them
                engine.close()
    guard.check(retriever.base_url, f"The {len(done)} finished samples are kept in {samples_path}.")
    if teacher_failed > c.teacher.max_failure_rate * max(run["new_samples"], TEACHER_MIN_SAMPLES):
        raise RunFailed(
            f"stopped: {teacher_failed} of {run['new_samples']} samples failed on the teacher at {c.teacher.base_url} "
            f"(collect.teacher.max_failure_rate={c.teacher.max_failure_rate:g}; last error: {_last_error(done)}). "
            f"The finished samples are kept in {samples_path}; check the endpoint, then rerun the same command to resume."
        )
    return CollectResult(out, report, run["new_samples"], _paths(out))


def _paths(out: Path) -> dict[str, Path]:
    return {"samples": out / SAMPLES, "trajectories": out / TRAJECTORIES, "report": out / REPORT}


def _finish(
    cfg: ExperimentConfig,
    out: Path,
    planned: Sequence[Question],
    done: dict[str, dict[str, Any]],
    teacher: dict[str, str],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Re-apply the filters to every sample; write trajectories.jsonl and the report."""
    records = [apply_filters(done[q.id], cfg.collect.filters) for q in planned if q.id in done]
    kept = [r for r in records if r["kept"]]
    lines = (json.dumps({k: v for k, v in r.items() if k not in ("filters", "kept", "rejected_by")}, ensure_ascii=False) for r in kept)
    atomic_write_text(out / TRAJECTORIES, "".join(line + "\n" for line in lines))
    report = build_report(cfg, planned, records, teacher, run)
    report["outputs"] = {k: str(v) for k, v in _paths(out).items()}
    atomic_write_json(out / REPORT, report)
    return report


def build_report(
    cfg: ExperimentConfig,
    planned: Sequence[Question],
    records: Sequence[dict[str, Any]],
    teacher: dict[str, str],
    run: dict[str, Any],
) -> dict[str, Any]:
    c, t = cfg.collect, cfg.collect.teacher
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    kept = [r for r in records if r["kept"]]
    settings = c.filters.model_dump()
    per_filter = {}
    for name in FILTERS:
        judged = [r["filters"][name] for r in ok if name in r["filters"]]
        per_filter[name] = {
            "setting": settings[name],
            "passed": sum(v["passed"] for v in judged) if judged else None,
            "rejected": sum(not v["passed"] for v in judged) if judged else None,
            "only_reason": sum(r["rejected_by"] == [name] for r in ok),
        }
    prompt_tokens = sum(r["stats"]["prompt_tokens"] for r in records)
    completion_tokens = sum(r["stats"]["completion_tokens"] for r in records)
    cost = None
    if t.engine == "openai" and (t.price_input_per_mtok is not None or t.price_output_per_mtok is not None):
        pin, pout = t.price_input_per_mtok or 0.0, t.price_output_per_mtok or 0.0
        cost = {
            "usd": round(prompt_tokens * pin / 1e6 + completion_tokens * pout / 1e6, 4),
            "usd_per_kept_trajectory": round((prompt_tokens * pin + completion_tokens * pout) / 1e6 / len(kept), 6) if kept else None,
            "price_input_per_mtok": pin,
            "price_output_per_mtok": pout,
        }

    def mean(rows: Sequence[dict[str, Any]], key: str) -> float:
        return round(sum(r["stats"][key] for r in rows) / len(rows), 4) if rows else 0.0

    n_new, elapsed = run["new_samples"], run["wall_s"]
    return {
        "teacher": teacher,
        "dataset": c.dataset,
        "questions": len({q.meta["question_id"] for q in planned}),
        "samples_per_question": c.samples_per_question,
        "samples_planned": len(planned),
        "samples_done": len(records),
        "samples_ok": len(ok),
        "failed": len(failed),
        "failure_reasons": dict(Counter(_failure_kind(r) for r in failed)),
        "kept": len(kept),
        "keep_rate": round(len(kept) / len(ok), 4) if ok else 0.0,
        "questions_with_a_kept_trajectory": len({r["question_id"] for r in kept}),
        "filters": per_filter,
        "mean_searches": mean(ok, "searches"),
        "mean_searches_kept": mean(kept, "searches"),
        "mean_turns": mean(ok, "turns"),
        "stop_reasons": dict(Counter(r["stats"]["stop_reason"] for r in records)),
        "tokens": {
            "prompt": prompt_tokens,
            "completion": completion_tokens,
            "completion_per_sample": round(completion_tokens / len(records), 1) if records else 0.0,
            "prompt_per_sample": round(prompt_tokens / len(records), 1) if records else 0.0,
        },
        "cost": cost,
        "this_run": {
            "new_samples": n_new,
            "wall_s": round(elapsed, 3),
            "samples_per_s": round(n_new / elapsed, 4) if n_new and elapsed > 0 else 0.0,
            "completion_tokens_per_s": round(run["completion_tokens"] / elapsed, 1) if n_new and elapsed > 0 else 0.0,
            "endpoint": run["endpoint"],
        },
    }


def _last_error(done: dict[str, dict[str, Any]]) -> str:
    return next((str(r["error"])[:300] for r in reversed(list(done.values())) if r.get("error")), "none")


def _failure_kind(record: dict[str, Any]) -> str:
    error = str(record.get("error", ""))
    return "retriever" if error.startswith("retriever") else "teacher"


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="collect", unit=" traj", dynamic_ncols=True)


__all__ = ["FILTERS", "CollectError", "CollectResult", "apply_filters", "collect", "judge", "plan", "settings_fingerprint"]
