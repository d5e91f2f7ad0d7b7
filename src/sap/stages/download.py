"""``sap data download``: what the paper recipe needs, fetched from the Hugging Face hub with
``huggingface_hub`` (``HF_ENDPOINT`` picks the hub; ``HF_TOKEN`` authenticates).

Each source is a hub repo (all its files, or the ones named) saved under ``<root>/<local_dir>``,
then turned into what sap reads (:data:`PAPER_SOURCES`). Before anything is fetched the plan is
printed: each source's files and the GB still to download. Then, file by file:

- resumable: the bytes received are kept in ``<local_dir>/.sap-partial/<file>.part`` and a later
  run continues them with an HTTP ``Range`` request (through ``huggingface_hub``'s own
  ``get_hf_file_metadata`` and ``http_get``: hub redirects, auth, retries; its
  ``hf_hub_download`` discards partial files since 1.x, so it cannot resume across runs);
- checksummed: each file is checked against the hub's own record, the SHA-256 of an LFS file
  or the git blob SHA-1 of a small one; a mismatch deletes the file and fails the command
  (exit 1); checked files are listed in ``<local_dir>/.sap-verified.json`` (name, size, mtime)
  so that a rerun does not hash them again;
- post-processing writes its output atomically and records itself in the same file, so a
  finished source is skipped as a whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sap.rules.atomic import atomic_path, atomic_write_json
from sap.rules.errors import RunFailed, SapError


class DownloadError(SapError, ValueError):
    """A source that cannot be planned (unknown name, repo or file)."""


class DownloadFailed(RunFailed):
    """A file whose download broke off (what arrived is kept for the next run)."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class ChecksumMismatch(RunFailed):
    """A downloaded file whose content is not what the hub says it is."""


@dataclass(frozen=True)
class Source:
    name: str
    repo_id: str
    repo_type: Literal["model", "dataset"]
    local_dir: str
    """Folder under the download root."""
    files: tuple[str, ...] | None
    """Files of the repo to fetch; None: all of them."""
    where: str
    """Where the repo id is written (the paper's files, or else)."""
    then: str | None = None
    """Post-processing step (:data:`POST_STEPS`)."""


PAPER_SOURCES: tuple[Source, ...] = (
    Source(
        "nq_search",
        "RUC-NLPIR/FlashRAG_datasets",
        "dataset",
        "flashrag",
        ("nq/train.jsonl", "nq/test.jsonl"),
        "paper-code scripts/data_process/nq_search.py (load_dataset('RUC-NLPIR/FlashRAG_datasets', 'nq'))",
        "nq_search_parquet",
    ),
    Source(
        "wiki18_corpus",
        "PeterJinGo/wiki-18-corpus",
        "dataset",
        "wiki-18",
        ("wiki-18.jsonl.gz",),
        "not in the paper's files (its retrieval_launch.sh names wiki-18.jsonl); Search-R1's scripts/download.py",
        "gunzip_corpus",
    ),
    Source(
        "wiki18_e5_index",
        "PeterJinGo/wiki-18-e5-index",
        "dataset",
        "wiki-18",
        ("part_aa", "part_ab"),
        "not in the paper's files (its retrieval_launch.sh names e5_Flat.index); Search-R1's scripts/download.py",
        "concat_index",
    ),
    Source("e5_base_v2", "intfloat/e5-base-v2", "model", "models/e5-base-v2", None, "paper-code retrieval_launch.sh"),
    Source("qwen2.5_3b_instruct", "Qwen/Qwen2.5-3B-Instruct", "model", "models/Qwen2.5-3B-Instruct", None, "paper-code SFT/SFT_Readme.md"),
    Source(
        "searchr1_rl",
        "PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-3b-it-em-ppo",
        "model",
        "models/SearchR1-nq_hotpotqa_train-qwen2.5-3b-it-em-ppo",
        None,
        "paper-code run_nq_eval.sh (the paper's RL-only group)",
    ),
    Source(
        "afm_mhqa_sft",
        "PersonalAILab/AFM-MHQA-Agent-SFT-Dataset",
        "dataset",
        "afm_mhqa_sft",
        None,
        "not in the paper's files (they name only the file AFM-MHQA-Agent-SFT-Dataset.json); the AFM project's "
        "data/mhqa_agent download script (OPPO-PersonalAI/Agent_Foundation_Models)",
    ),
)

VERIFIED = ".sap-verified.json"


@dataclass
class PlannedFile:
    source: Source
    filename: str
    size: int
    sha256: str | None
    blob_id: str | None
    present: bool = False
    """Already downloaded and checked."""


@dataclass
class Plan:
    root: Path
    commits: dict[str, str] = field(default_factory=dict)
    files: list[PlannedFile] = field(default_factory=list)
    done_sources: list[str] = field(default_factory=list)
    """Sources whose post-processing finished earlier (nothing to do)."""

    @property
    def bytes_to_download(self) -> int:
        return sum(f.size for f in self.files if not f.present)

    def summary(self) -> str:
        lines = [f"download root: {self.root}"]
        by_source: dict[str, list[PlannedFile]] = {}
        for f in self.files:
            by_source.setdefault(f.source.name, []).append(f)
        for name in self.done_sources:
            lines.append(f"  {name:<22} done earlier")
        for name, files in by_source.items():
            s = files[0].source
            todo = sum(f.size for f in files if not f.present)
            have = sum(f.size for f in files if f.present)
            lines.append(
                f"  {name:<22} {s.repo_type} {s.repo_id}: {len(files)} file(s), {gb(todo)} GB to fetch"
                + (f" ({gb(have)} GB already here)" if have else "")
                + f" -> {self.root / s.local_dir}"
            )
        lines.append(f"total to download: {gb(self.bytes_to_download)} GB")
        free = free_bytes(self.root)
        if free is not None:
            lines.append(f"free disk at {self.root}: {gb(free)} GB" + ("  -- NOT ENOUGH" if free < self.bytes_to_download else ""))
        if any(f.source.then == "concat_index" and not f.present for f in self.files):
            lines.append("  (the index parts are joined into e5_Flat.index and then deleted: about as much again while joining)")
        return "\n".join(lines)


def free_bytes(path: Path) -> int | None:
    """Free space of the file system ``path`` is (or will be) on."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def select(names: Sequence[str] = (), sources: Sequence[Source] = PAPER_SOURCES) -> list[Source]:
    if not names:
        return list(sources)
    known = {s.name: s for s in sources}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DownloadError(f"--only {', '.join(unknown)}: unknown source (known: {', '.join(known)})")
    return [known[n] for n in names]


# --- checksums ------------------------------------------------------------------------------


def _digest(path: Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo)
    h.update(prefix)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the hub reports as ``blobId`` for non-LFS files)."""
    return _digest(path, "sha1", f"blob {path.stat().st_size}\0".encode())


def _read_verified(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(folder: Path, f: PlannedFile, verified: dict[str, Any]) -> bool:
    path = folder / f.filename
    entry = verified.get("files", {}).get(f.filename)
    return path.is_file() and entry is not None and entry.get("stamp") == _stamp(path) and entry.get("checksum") == _expected(f)


def _expected(f: PlannedFile) -> str:
    return f"sha256:{f.sha256}" if f.sha256 else f"git-sha1:{f.blob_id}"


def check_file(path: Path, f: PlannedFile) -> None:
    """Raise :class:`ChecksumMismatch` (and delete the file) when ``path`` is not the hub's file."""
    size = path.stat().st_size
    if f.sha256:
        got, want = _digest(path, "sha256"), f.sha256
    elif f.blob_id:
        got, want = git_blob_sha1(path), f.blob_id
    else:
        got, want = str(size), str(f.size)
    if got != want or (f.size is not None and size != f.size):
        path.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{path}: checksum mismatch for {f.source.repo_id}/{f.filename} (got {got[:16]}…, {size} bytes; the hub says "
            f"{want[:16]}…, {f.size} bytes); the file was deleted: run the command again to fetch it anew"
        )


# --- planning and downloading ---------------------------------------------------------------


def plan_downloads(sources: Iterable[Source], root: str | Path) -> Plan:
    """Ask the hub for each source's files, sizes and checksums (no file is fetched)."""
    from huggingface_hub import HfApi

    api = HfApi()
    plan = Plan(Path(root))
    for s in sources:
        folder = plan.root / s.local_dir
        verified = _read_verified(folder)
        if s.then and s.then in verified.get("post", {}):
            plan.done_sources.append(s.name)
            continue
        try:
            info = api.repo_info(s.repo_id, repo_type=s.repo_type, files_metadata=True)
        except Exception as e:  # HTTP, network and auth errors of the client: named, with the fix
            raise DownloadError(
                f"{s.name}: cannot list {s.repo_type} {s.repo_id} on {_endpoint()} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "check the network, HF_ENDPOINT, and HF_TOKEN for gated repos"
            ) from None
        plan.commits[s.name] = info.sha
        siblings = {x.rfilename: x for x in info.siblings or []}
        wanted = s.files if s.files is not None else tuple(sorted(n for n in siblings if not n.startswith(".git")))
        missing = [n for n in wanted if n not in siblings]
        if missing:
            raise DownloadError(f"{s.repo_id} ({s.repo_type}) has no file {', '.join(missing)}")
        for name in wanted:
            sib = siblings[name]
            pf = PlannedFile(s, name, int(sib.size or 0), sib.lfs.sha256 if sib.lfs else None, sib.blob_id)
            pf.present = _is_verified(folder, pf, verified)
            plan.files.append(pf)
    return plan


@dataclass
class DownloadResult:
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


PARTIAL_DIR = ".sap-partial"


def fetch_file(f: PlannedFile, commit: str, folder: Path) -> Path:
    """One hub file into ``folder``, through the hub client's own HEAD (redirects, auth) and
    ``http_get`` (retries, progress bar, ``Range`` resume). Bytes go to
    ``folder/.sap-partial/<file>.part``, continued across runs; the finished file is checked,
    then renamed into place."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(f.source.repo_id, f.filename, repo_type=f.source.repo_type, revision=commit)
    meta = get_hf_file_metadata(url)
    part = folder / PARTIAL_DIR / f"{f.filename}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > f.size:
        part.unlink()
        have = 0
    with part.open("r+b" if part.exists() else "wb") as out:
        out.seek(0, os.SEEK_END)
        if have < f.size:
            http_get(meta.location, out, resume_size=have, headers=build_hf_headers(), expected_size=f.size, displayed_filename=f.filename)
        out.flush()
        os.fsync(out.fileno())
    check_file(part, f)
    dest = folder / f.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    part.replace(dest)
    return dest


def run_downloads(plan: Plan, echo: Callable[[str], None] = print) -> DownloadResult:
    """Fetch, check and post-process every planned file (see the module docstring)."""
    result = DownloadResult()
    sources: dict[str, Source] = {}
    for f in plan.files:
        sources[f.source.name] = f.source
        folder = plan.root / f.source.local_dir
        label = f"{f.source.repo_id}/{f.filename}"
        if f.present:
            result.skipped.append(label)
            continue
        echo(f"fetching {label} ({gb(f.size)} GB)")
        try:
            path = fetch_file(f, plan.commits[f.source.name], folder)
        except ChecksumMismatch:
            raise
        except Exception as e:  # the partial file stays: the next run resumes it
            raise DownloadFailed(
                f"{label}: download from {_endpoint()} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "run the same command again to resume"
            ) from None
        verified = _read_verified(folder)
        verified.setdefault("files", {})[f.filename] = {"stamp": _stamp(path), "checksum": _expected(f)}
        verified.setdefault("commits", {})[f.source.repo_id] = plan.commits[f.source.name]
        atomic_write_json(folder / VERIFIED, verified)
        result.fetched.append(label)
    for name, s in sources.items():
        if s.then:
            folder = plan.root / s.local_dir
            out = POST_STEPS[s.then](folder, plan.root, s)
            verified = _read_verified(folder)
            verified.setdefault("post", {})[s.then] = str(out)
            atomic_write_json(folder / VERIFIED, verified)
            result.outputs[name] = str(out)
            echo(f"{name}: {s.then} -> {out}")
    return result


def download(names: Sequence[str] = (), root: str | Path = "downloads", dry_run: bool = False, echo: Callable[[str], None] = print):
    """Plan (printed first, with the GB to fetch), then fetch unless ``dry_run``."""
    plan = plan_downloads(select(names), root)
    echo(plan.summary())
    if dry_run:
        return plan, None
    return plan, run_downloads(plan, echo)


# --- post-processing ------------------------------------------------------------------------


def gunzip_corpus(folder: Path, root: Path, source: Source) -> Path:
    """``wiki-18.jsonl.gz`` -> ``wiki-18.jsonl`` (the corpus ``retriever.corpus`` names)."""
    out = folder / "wiki-18.jsonl"
    with atomic_path(out) as tmp, gzip.open(folder / "wiki-18.jsonl.gz", "rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    return out


def concat_index(folder: Path, root: Path, source: Source) -> Path:
    """``part_aa`` + ``part_ab`` -> ``e5_Flat.index`` (Search-R1's flat E5 FAISS index, as
    ``cat part_* > e5_Flat.index``); the parts are deleted once the index is complete."""
    out = folder / "e5_Flat.index"
    parts = [folder / name for name in source.files or ()]
    with atomic_path(out) as tmp, tmp.open("wb") as fout:
        for part in parts:
            with part.open("rb") as fin:
                shutil.copyfileobj(fin, fout, 1 << 22)
    for part in parts:
        part.unlink()
    return out


NQ_SEARCH_DIR = "nq_search"


def nq_search_rows(records: Iterable[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """FlashRAG NQ records -> Search-R1's ``nq_search`` parquet rows, as the paper's
    ``nq_search.py`` writes them: the record's own fields (question stripped and given a
    trailing ``?``), then data_source, the prompt as a one-message chat, ability, reward_model
    and extra_info (split, index)."""
    from sap.rules.prompts import build_prompt

    rows = []
    for idx, r in enumerate(records):
        row = dict(r)
        q = str(row["question"]).strip()
        if not q.endswith("?"):
            q += "?"
        row["question"] = q
        row.update(
            data_source="nq",
            prompt=[{"role": "user", "content": build_prompt(q, "searchr1")}],
            ability="fact-reasoning",
            reward_model={"style": "rule", "ground_truth": {"target": list(r["golden_answers"])}},
            extra_info={"split": split, "index": idx},
        )
        rows.append(row)
    return rows


def nq_search_parquet(folder: Path, root: Path, source: Source) -> Path:
    """FlashRAG's ``nq/{train,test}.jsonl`` -> ``<root>/nq_search/{train,test}.parquet``."""
    import pandas as pd

    out_dir = root / NQ_SEARCH_DIR
    for split in ("train", "test"):
        with (folder / "nq" / f"{split}.jsonl").open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        with atomic_path(out_dir / f"{split}.parquet", suffix=".parquet") as tmp:
            pd.DataFrame(nq_search_rows(records, split)).to_parquet(tmp, index=False)
    return out_dir


POST_STEPS: dict[str, Callable[[Path, Path, Source], Path]] = {
    "nq_search_parquet": nq_search_parquet,
    "gunzip_corpus": gunzip_corpus,
    "concat_index": concat_index,
}
