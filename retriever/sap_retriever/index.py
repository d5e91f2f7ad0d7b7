"""Index building and loading.

An index directory holds everything the server needs::

    meta.json                 backend, encoder settings, index types, n_docs, dim, source
    corpus/                   the memory-mapped passage store (see corpus.py)
    embeddings/shard_*.npy    dense: float32 embeddings, one atomically written file per shard
    faiss_<type>.index        dense: one FAISS index per type (flat, hnsw, sq8, ivfpq)
    bm25/                     bm25: the bm25s index

Each step skips what a previous run already finished, so an interrupted build resumes.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sap.rules.atomic import atomic_path, atomic_write_json
from sap.rules.config import EncoderConfig, RetrieverConfig, RetrieverIndexConfig
from sap.rules.errors import SapError
from sap_retriever.corpus import CorpusError, Passage, PassageStore, read_passages, write_store

log = logging.getLogger("sap_retriever")

META = "meta.json"
INDEX_TYPES = ("flat", "hnsw", "sq8", "ivfpq")


class RetrieverIndexError(SapError, RuntimeError):
    """An index that cannot be built or loaded; the message says what to do."""


# --- building -------------------------------------------------------------------------------


def _ensure_store(corpus: Path, out: Path, limit: int | None, progress: bool) -> PassageStore:
    store_dir = out / "corpus"
    info = store_dir / "store.json"
    if info.is_file():
        prev = json.loads(info.read_text(encoding="utf-8"))
        if prev.get("source") == _source_key(corpus, limit):
            return PassageStore(store_dir)
    write_store(read_passages(corpus, limit), store_dir, source=_source_key(corpus, limit), progress=progress)
    store = PassageStore(store_dir)
    if len(store) == 0:
        raise CorpusError(f"{corpus}: no passages")
    return store


def _source_key(corpus: Path, limit: int | None) -> str:
    st = corpus.stat()
    return f"{corpus.resolve()}|{st.st_size}|{int(st.st_mtime)}|limit={limit}"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, arr)


def embed_corpus(
    store: PassageStore, out: Path, enc_cfg: EncoderConfig, shard_size: int, progress: bool = True, encoder: Any = None
) -> int:
    """Write ``embeddings/shard_*.npy``, skipping shards already written. Returns the dim."""
    emb_dir = out / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(store) / shard_size)
    todo = [k for k in range(n_shards) if not (emb_dir / f"shard_{k:05d}.npy").is_file()]
    if todo and encoder is None:
        from sap_retriever.encoder import Encoder

        encoder = Encoder(enc_cfg)
    bar = None
    if progress:
        from tqdm import tqdm

        done = sum(min(shard_size, len(store) - k * shard_size) for k in range(n_shards) if k not in todo)
        bar = tqdm(total=len(store), initial=done, desc="embed", unit=" passages")
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(store))
        parts = []
        for b in range(start, stop, enc_cfg.batch_size):
            texts = list(store.iter_contents(b, min(b + enc_cfg.batch_size, stop)))
            parts.append(encoder.encode_passages(texts))
            if bar is not None:
                bar.update(len(texts))
        _save_npy(emb_dir / f"shard_{k:05d}.npy", np.concatenate(parts).astype(np.float32, copy=False))
    if bar is not None:
        bar.close()
    first = np.load(emb_dir / "shard_00000.npy", mmap_mode="r")
    return int(first.shape[1])


def iter_shards(out: Path):
    for path in sorted((out / "embeddings").glob("shard_*.npy")):
        yield np.ascontiguousarray(np.load(path))


def make_faiss_index(kind: str, dim: int, n: int, cfg: RetrieverIndexConfig):
    """An empty FAISS index of ``kind`` for ``n`` vectors of ``dim`` (inner product)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index
    if kind == "sq8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip)
    if kind == "ivfpq":
        if dim % cfg.pq_m:
            raise RetrieverIndexError(f"ivfpq: pq_m={cfg.pq_m} must divide the embedding dimension {dim}")
        nlist = max(1, min(cfg.ivf_nlist, n // 39))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, cfg.pq_m, 8, ip)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        return index
    raise RetrieverIndexError(f"unknown index type {kind!r}; known: {', '.join(INDEX_TYPES)}")


def build_faiss(kind: str, vectors_iter, dim: int, n: int, cfg: RetrieverIndexConfig, train_sample: np.ndarray | None = None):
    """Build a FAISS index from an iterable of float32 blocks (trained on ``train_sample``,
    or on the first block, when the type needs training)."""
    index = make_faiss_index(kind, dim, n, cfg)
    blocks = iter(vectors_iter)
    first = next(blocks)
    if not index.is_trained:
        sample = train_sample if train_sample is not None else first
        if kind == "ivfpq" and len(sample) < 256:
            raise RetrieverIndexError(
                f"ivfpq needs at least 256 vectors to train, got {len(sample)}; use flat or sq8 for a corpus this small"
            )
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.add(first)
    for block in blocks:
        index.add(block)
    return index


def write_faiss(index, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _train_sample(out: Path, n_max: int = 200_000) -> np.ndarray:
    parts, got = [], 0
    for block in iter_shards(out):
        parts.append(block[: n_max - got])
        got += len(parts[-1])
        if got >= n_max:
            break
    return np.concatenate(parts)


def build_index(
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    backend: str = "dense",
    encoder: EncoderConfig | None = None,
    index_cfg: RetrieverIndexConfig | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish building) an index directory; returns its meta."""
    corpus, out = Path(corpus), Path(out)
    index_cfg = index_cfg or RetrieverIndexConfig(backend=backend)
    if not corpus.exists():
        raise CorpusError(f"{corpus}: corpus file not found")
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": 1, "backend": backend, "source": str(corpus), "limit": limit}
    if backend == "lucene":
        if not corpus.is_dir():
            raise RetrieverIndexError(f"{corpus}: for --backend lucene, --corpus is the directory of a prebuilt Lucene (pyserini) index")
        meta.update(lucene_index=str(corpus.resolve()), n_docs=None)
    else:
        store = _ensure_store(corpus, out, limit, progress)
        meta["n_docs"] = len(store)
        if backend == "dense" and index_cfg.prebuilt:
            enc = encoder or EncoderConfig()
            dim = adopt_flat_index(Path(index_cfg.prebuilt), out, len(store))
            meta.update(encoder=enc.model_dump(), dim=dim, index_types=["flat"], index=index_cfg.model_dump())
        elif backend == "dense":
            enc = encoder or EncoderConfig()
            dim = embed_corpus(store, out, enc, index_cfg.shard_size, progress=progress)
            sample = None
            for kind in index_cfg.index_types:
                path = out / f"faiss_{kind}.index"
                if path.is_file():
                    continue
                log.info("building %s index over %d vectors", kind, len(store))
                if kind in ("sq8", "ivfpq") and sample is None:
                    sample = _train_sample(out)
                write_faiss(build_faiss(kind, iter_shards(out), dim, len(store), index_cfg, sample), path)
            meta.update(encoder=enc.model_dump(), dim=dim, index_types=list(index_cfg.index_types), index=index_cfg.model_dump())
        elif backend == "bm25":
            _build_bm25(store, out / "bm25", progress)
        else:
            raise RetrieverIndexError(f"unknown backend {backend!r}; known: dense, bm25, lucene")
    meta["built"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(out / META, meta)
    return meta


def flat_index_header(path: Path) -> tuple[str, int, int]:
    """(kind, dim, ntotal) from the header of a FAISS flat index file, without reading the
    vectors: fourcc ``IxFI`` (inner product) or ``IxF2`` (L2), int32 d, int64 ntotal."""
    import struct

    with path.open("rb") as f:
        head = f.read(16)
    if len(head) < 16 or head[:4] not in (b"IxFI", b"IxF2"):
        raise RetrieverIndexError(f"{path}: not a flat FAISS index (header {head[:4]!r}; expected IxFI or IxF2)")
    d, ntotal = struct.unpack("<iq", head[4:16])
    return head[:4].decode(), d, ntotal


def adopt_flat_index(prebuilt: Path, out: Path, n_docs: int) -> int:
    """Use a prebuilt flat FAISS index as ``out/faiss_flat.index`` (hard link, else symbolic
    link: 65 GB are not copied). Its row count must equal the corpus's. Returns the dim."""
    if not prebuilt.is_file():
        raise RetrieverIndexError(f"retriever.index.prebuilt: {prebuilt} not found (sap data download fetches Search-R1's e5_Flat.index)")
    _kind, dim, ntotal = flat_index_header(prebuilt)
    if ntotal != n_docs:
        raise RetrieverIndexError(
            f"{prebuilt}: {ntotal} vectors but the corpus has {n_docs} passages: the index was built over another corpus "
            "(row i must embed passage i)"
        )
    target = out / "faiss_flat.index"
    if target.is_file() and target.resolve() == prebuilt.resolve():
        return dim
    target.unlink(missing_ok=True)
    try:
        os.link(prebuilt, target)
    except OSError:
        target.symlink_to(prebuilt.resolve())
    return dim


def build_from_config(
    rc: RetrieverConfig, corpus: str | os.PathLike[str], out: str | os.PathLike[str], limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """``sap retriever index``: :func:`build_index` with the backend, encoder and index types of
    ``retriever.*`` (the packaged MiniLM gets its own settings: :func:`effective_config`)."""
    from sap_retriever.encoder import effective_config

    return build_index(corpus, out, rc.index.backend, effective_config(rc.encoder), rc.index, limit=limit, progress=progress)


BM25_STOPWORDS = "en"


def _build_bm25(store: PassageStore, out: Path, progress: bool) -> None:
    import bm25s

    if (out / "params.index.json").is_file():
        return
    tokens = bm25s.tokenize(list(store.iter_contents()), stopwords=BM25_STOPWORDS, show_progress=progress)
    model = bm25s.BM25()
    model.index(tokens, show_progress=progress)
    with atomic_path(out) as tmp:
        model.save(str(tmp))


# --- searching ------------------------------------------------------------------------------

Results = list[list[tuple[Passage, float]]]


class Searcher:
    """Answers a batch of queries with the top-k passages and scores of each."""

    backend: str = ""
    index_type: str = ""
    n_docs: int = 0

    def search(self, queries: Sequence[str], topk: int) -> Results:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "index_type": self.index_type, "n_docs": self.n_docs, "encoder": None}


class DenseSearcher(Searcher):
    backend = "dense"

    def __init__(self, index_dir: Path, meta: dict[str, Any], index_type: str | None = None, gpu: bool = False, compile: bool = False):
        import faiss

        from sap_retriever.encoder import Encoder

        self.index_type = index_type or meta["index_types"][0]
        path = index_dir / f"faiss_{self.index_type}.index"
        if not path.is_file():
            raise RetrieverIndexError(f"{index_dir}: no {self.index_type!r} index (built: {', '.join(meta['index_types'])})")
        self.store = PassageStore(index_dir / "corpus")
        self.n_docs = len(self.store)
        self.encoder_cfg = EncoderConfig(**meta["encoder"])
        self.encoder = Encoder(self.encoder_cfg, compile=compile)
        index = faiss.read_index(str(path))
        if self.index_type == "hnsw":
            index.hnsw.efSearch = meta.get("index", {}).get("hnsw_ef_search", 128)
        self.gpus = 0
        if gpu:
            self.gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            if self.gpus == 0:
                raise RetrieverIndexError("--gpu: this faiss has no GPU support or no GPU is visible (install faiss-gpu)")
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True
            co.useFloat16 = True
            index = faiss.index_cpu_to_all_gpus(index, co=co)
        self.index = index

    def search(self, queries: Sequence[str], topk: int) -> Results:
        q = self.encoder.encode_queries(list(queries))
        scores, rows = self.index.search(q, min(topk, self.n_docs))
        return [
            [(self.store[int(r)], float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0] for rr, ss in zip(rows, scores, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "encoder": self.encoder.describe(), "gpus": self.gpus}


class BM25Searcher(Searcher):
    backend = "bm25"
    index_type = "bm25"

    def __init__(self, index_dir: Path, threads: int = 0):
        import bm25s

        self.store = PassageStore(index_dir / "corpus")
        self.n_docs = len(self.store)
        self.model = bm25s.BM25.load(str(index_dir / "bm25"), mmap=True)
        self.threads = threads

    def search(self, queries: Sequence[str], topk: int) -> Results:
        import bm25s

        tokens = bm25s.tokenize(list(queries), stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)
        k = min(topk, self.n_docs)
        rows, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=self.threads or 1)
        return [[(self.store[int(r)], float(s)) for r, s in zip(rr, ss, strict=True)] for rr, ss in zip(rows, scores, strict=True)]


class LuceneSearcher(Searcher):
    """Search-R1's prebuilt BM25 (pyserini/Lucene) index; needs ``pip install pyserini`` and Java."""

    backend = "lucene"
    index_type = "lucene"

    def __init__(self, meta: dict[str, Any], threads: int = 0):
        try:
            from pyserini.search.lucene import LuceneSearcher as _Lucene
        except ImportError:
            raise RetrieverIndexError("the lucene backend needs pyserini (pip install pyserini; it needs a Java 21 runtime)") from None
        self.searcher = _Lucene(meta["lucene_index"])
        self.n_docs = self.searcher.num_docs
        self.threads = threads or 1

    def search(self, queries: Sequence[str], topk: int) -> Results:
        qids = [str(i) for i in range(len(queries))]
        found = self.searcher.batch_search(list(queries), qids, k=topk, threads=self.threads)
        out: Results = []
        for qid in qids:
            row = []
            for hit in found.get(qid, []):
                raw = json.loads(self.searcher.doc(hit.docid).raw())
                contents = raw.get("contents") or f'"{raw.get("title", "")}"\n{raw.get("text", "")}'
                row.append((Passage(str(hit.docid), contents), float(hit.score)))
            out.append(row)
        return out


def read_meta(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(index_dir) / META
    if not path.is_file():
        raise RetrieverIndexError(f"{index_dir}: not an index directory (no {META}); build one with 'sap retriever index'")
    return json.loads(path.read_text(encoding="utf-8"))


def load_searcher(
    index_dir: str | os.PathLike[str], index_type: str | None = None, gpu: bool = False, threads: int = 0, compile: bool = False
) -> Searcher:
    """The searcher for a built index; ``compile`` compiles a dense index's query encoder."""
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    backend = meta["backend"]
    if backend == "dense":
        return DenseSearcher(index_dir, meta, index_type, gpu, compile=compile)
    if index_type not in (None, backend):
        raise RetrieverIndexError(f"{index_dir}: a {backend} index has no index type {index_type!r}")
    if backend == "bm25":
        return BM25Searcher(index_dir, threads)
    if backend == "lucene":
        return LuceneSearcher(meta, threads)
    raise RetrieverIndexError(f"{index_dir}: unknown backend {backend!r} in {META}")
