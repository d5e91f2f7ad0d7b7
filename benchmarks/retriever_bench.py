"""Retriever benchmark: sap's server vs a Search-R1-style baseline, in one run, on one index.

    .venv/bin/python benchmarks/retriever_bench.py                 # everything (about 10 min on 2 cores)
    .venv/bin/python benchmarks/retriever_bench.py --skip-index-types --requests 1000

1. Builds (or reuses) a MiniLM index over the oracle passages (``indexes/oracle-minilm``:
   flat and sq8) and reports hit@3 of the 2,655 oracle questions for each index type.
2. Serves it three times, each in its own process: a baseline that does what Search-R1's
   ``retrieval_server.py`` does (a synchronous FastAPI endpoint: one float32 encoder call and
   one index search per request, documents looked up one by one), sap's server with its
   defaults (micro-batched; bfloat16 encoder where the CPU has it), and sap's server with
   ``--compile``. Loads each with single-query requests at concurrency 1, 8 and 32 and prints
   requests/s and p50/p99 latency, plus 32 queries per request as the batched ceiling: the
   three run side by side and each load is repeated, alternating servers, so that the
   figures of one round share the machine's state (the median round is reported). The
   load generator is a lean keep-alive HTTP/1.1 client on raw asyncio streams so that it
   takes little of the CPU the servers share with it.
3. Builds every FAISS index type over synthetic clustered vectors (default 1M x 768, E5's
   dimension) and prints memory, recall@3 against flat, and the projection to 21M passages.

Speed is reported as ratios against the baseline measured in the same run, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI18 = 21_015_324  # passages in Search-R1's wiki-18 corpus


# --- the baseline server --------------------------------------------------------------------


def serve_baseline(index_dir: Path, port: int, index_type: str) -> None:
    """Search-R1's serving pattern over sap's index files (same encoder, same FAISS index)."""
    import faiss
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from sap.rules.config import EncoderConfig
    from sap_retriever.corpus import PassageStore
    from sap_retriever.encoder import Encoder
    from sap_retriever.index import read_meta

    meta = read_meta(index_dir)
    # Search-R1 runs its encoder in float32 on CPU (half precision only on GPU).
    encoder = Encoder(EncoderConfig(**{**meta["encoder"], "cpu_dtype": "float32"}))
    index = faiss.read_index(str(index_dir / f"faiss_{index_type}.index"))
    store = PassageStore(index_dir / "corpus")
    # Search-R1 keeps the corpus as a datasets table and indexes it row by row; a list of dicts
    # is faster than that, so this baseline is if anything generous.
    corpus = [{"id": p.id, "contents": p.contents} for p in (store[i] for i in range(len(store)))]

    class QueryRequest(BaseModel):
        queries: list[str]
        topk: int | None = None
        return_scores: bool = False

    app = FastAPI()

    def retrieve(request: QueryRequest):
        topk = request.topk or 3
        emb = encoder.encode_queries(request.queries)
        scores, idxs = index.search(emb, topk)
        out = []
        for row_idx, row_scores in zip(idxs, scores, strict=True):
            docs = [corpus[int(i)] for i in row_idx]
            out.append(
                [{"document": d, "score": float(s)} for d, s in zip(docs, row_scores, strict=True)] if request.return_scores else docs
            )
        return {"result": out}

    retrieve.__annotations__["request"] = QueryRequest  # a local class: resolve it for FastAPI here
    app.post("/retrieve")(retrieve)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- load generation ------------------------------------------------------------------------


async def _post(reader, writer, body: bytes) -> bytes:
    writer.write(
        b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    payload = await reader.readexactly(length)
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r}: {payload[:200]!r}")
    return payload


async def _load(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    next_i = 0

    async def worker():
        nonlocal next_i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_i < len(bodies):
                body = bodies[next_i]
                next_i += 1
                t = time.perf_counter()
                await _post(reader, writer, body)
                latencies.append(time.perf_counter() - t)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


def load(port: int, bodies: list[bytes], concurrency: int) -> dict[str, float]:
    asyncio.run(_load(port, bodies[: max(20, concurrency * 2)], concurrency))  # warm-up
    wall, lat = asyncio.run(_load(port, bodies, concurrency))
    lat.sort()
    return {
        "requests": len(bodies),
        "rps": len(bodies) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


# --- parts ----------------------------------------------------------------------------------


def ensure_index(index_dir: Path, oracle: Path) -> None:
    from sap.rules.config import RetrieverIndexConfig
    from sap_retriever.corpus import convert_oracle
    from sap_retriever.encoder import minilm_config
    from sap_retriever.index import build_index

    corpus = index_dir.parent / f"{index_dir.name}.corpus.jsonl"
    if not corpus.is_file():
        convert_oracle(oracle, corpus)
    t = time.perf_counter()
    build_index(
        corpus, index_dir, "dense", minilm_config(batch_size=128), RetrieverIndexConfig(index_types=["flat", "sq8", "hnsw"]), progress=True
    )
    print(f"index ready in {time.perf_counter() - t:.1f}s: {index_dir}")


def hit_at_3(index_dir: Path, oracle: Path) -> dict[str, float]:
    from sap_retriever.corpus import read_oracle
    from sap_retriever.index import load_searcher, read_meta

    questions = read_oracle(oracle)
    out = {}
    for kind in read_meta(index_dir)["index_types"]:
        searcher = load_searcher(index_dir, index_type=kind)
        hits = 0
        for i in range(0, len(questions), 256):
            chunk = questions[i : i + 256]
            rows = searcher.search([q.question for q in chunk], 3)
            hits += sum(any(p.contents == q.gold_contents for p, _ in row) for q, row in zip(chunk, rows, strict=True))
        out[kind] = hits / len(questions)
        print(f"hit@3 {kind:<5} {out[kind]:.4f}  ({hits}/{len(questions)} oracle questions)")
    return out


def serving(index_dir: Path, oracle: Path, n_requests: int, levels: list[int], rounds: int = 3) -> dict:
    """All servers run at once (idle ones take no CPU); each load is run ``rounds`` times,
    alternating servers, and the round with the median requests/s is reported, so that a
    passing disturbance of the shared machine hits every server alike."""
    from sap_retriever.corpus import read_oracle
    from sap_retriever.launch import ServerProcess, free_port

    questions = [q.question for q in read_oracle(oracle)]
    single = [
        json.dumps({"queries": [questions[i % len(questions)]], "topk": 3, "return_scores": True}).encode() for i in range(n_requests)
    ]
    batched = [
        json.dumps({"queries": [questions[(32 * i + j) % len(questions)] for j in range(32)], "topk": 3, "return_scores": True}).encode()
        for i in range(max(20, n_requests // 32))
    ]
    py = sys.executable
    commands = {
        "baseline": lambda port: [py, __file__, "baseline-serve", "--index", str(index_dir), "--port", str(port)],
        "sap": lambda port: [py, "-m", "sap", "retriever", "serve", "--index", str(index_dir), "--port", str(port)],
        # the same with its query encoder compiled (~1 min of warm-up before it reports ready)
        "sap-comp": lambda port: [py, "-m", "sap", "retriever", "serve", "--index", str(index_dir), "--port", str(port), "--compile"],
    }
    ports = {name: free_port() for name in commands}
    servers = contextlib.ExitStack()
    results: dict = {name: {} for name in commands}

    def median_round(runs: list[dict]) -> dict:
        runs = sorted(runs, key=lambda r: r["rps"])
        return {**runs[len(runs) // 2], "rps_all_rounds": [round(r["rps"], 1) for r in runs]}

    with servers:
        for name, cmd in commands.items():
            servers.enter_context(
                ServerProcess(cmd(ports[name]), f"http://127.0.0.1:{ports[name]}", startup_timeout_s=600, stop_timeout_s=20)
            )
        loads = [(f"c{c}", single[: min(len(single), 100 * c)], c) for c in levels] + [("batch32", batched, 1)]
        for key, bodies, c in loads:
            runs: dict[str, list[dict]] = {name: [] for name in commands}
            for _ in range(rounds):
                for name in commands:
                    runs[name].append(load(ports[name], bodies, c))
            for name in commands:
                r = results[name][key] = median_round(runs[name])
                if key == "batch32":
                    r["qps"] = 32 * r["rps"]
                    print(f"{name:<8} 32 queries/request, c=1: {r['qps']:8.1f} queries/s", flush=True)
                else:
                    print(f"{name:<8} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms", flush=True)
    for name in ("sap", "sap-comp"):
        for c in levels:
            ratio = results[name][f"c{c}"]["rps"] / results["baseline"][f"c{c}"]["rps"]
            results[f"ratio_{name}_c{c}"] = ratio
            print(f"{name} / baseline requests/s at c={c}: {ratio:.2f}x")
    return results


def index_types(n: int, dim: int, hnsw_n: int, n_queries: int = 1000, intrinsic: int = 64, seed: int = 0) -> dict:
    """Memory and recall@3 vs flat of each index type over ``n`` synthetic clustered vectors
    (HNSW over the first ``hnsw_n``, against flat over the same vectors: its build is the slow
    one, and its memory per vector does not depend on n)."""
    import faiss
    import numpy as np

    from sap.rules.config import RetrieverIndexConfig
    from sap_retriever.index import build_faiss

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, dim)).astype(np.float32)

    def sample(m: int) -> np.ndarray:
        z = rng.standard_normal((m, intrinsic)).astype(np.float32)
        v = z @ basis + 0.3 * rng.standard_normal((m, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    blocks = [sample(min(100_000, n - s)) for s in range(0, n, 100_000)]
    queries = sample(n_queries)
    # efConstruction 40 (faiss's default) keeps the HNSW build to minutes on two cores
    cfg = RetrieverIndexConfig(
        ivf_nlist=1024, ivf_nprobe=32, pq_m=dim // 8 if dim % 8 == 0 else 16, hnsw_ef_construction=40, hnsw_ef_search=128
    )
    train = blocks[0]
    print(f"\nindex types over {n:,} synthetic vectors (dim {dim}; hnsw over {hnsw_n:,}); projection to {WIKI18:,} passages:", flush=True)
    print(f"{'type':<6} {'vectors':>9} {'memory':>9} {'vs flat':>8} {'recall@3':>9} {'build':>8} {'ms/query':>9} {'at 21M':>9}", flush=True)
    out: dict = {}
    truth: dict[int, np.ndarray] = {}
    for kind in ("flat", "sq8", "ivfpq", "hnsw"):
        m = hnsw_n if kind == "hnsw" else n
        parts = blocks if m == n else [np.concatenate(blocks)[:m]]
        if m not in truth:
            flat = build_faiss("flat", parts, dim, m, cfg)
            truth[m] = flat.search(queries, 3)[1]
            del flat
        t = time.perf_counter()
        index = build_faiss(kind, parts, dim, m, cfg, train_sample=train)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        _, ids = index.search(queries, 3)
        search_ms = 1000 * (time.perf_counter() - t) / n_queries
        size = faiss.serialize_index(index).nbytes
        del index
        recall = float(np.mean([len(set(a) & set(b)) / 3 for a, b in zip(ids, truth[m], strict=True)]))
        r = {
            "vectors": m,
            "bytes": int(size),
            "bytes_per_vector": size / m,
            "recall_at_3": recall,
            "build_s": build_s,
            "search_ms_per_query": search_ms,
        }
        r["vs_flat"] = r["bytes_per_vector"] / (4 * dim)
        r["projected_21m_gb"] = r["bytes_per_vector"] * WIKI18 / 1e9
        out[kind] = r
        print(
            f"{kind:<6} {m:>9,} {size / 1e9:7.2f}GB {r['vs_flat']:7.1%} {recall:9.4f} {build_s:7.1f}s "
            f"{search_ms:9.3f} {r['projected_21m_gb']:7.1f}GB",
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    b = sub.add_parser("baseline-serve", help="(internal) run the baseline server")
    b.add_argument("--index", type=Path, required=True)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--index-type", default="flat")
    p.add_argument("--index", type=Path, default=REPO / "indexes" / "oracle-minilm")
    p.add_argument("--oracle", type=Path, default=REPO / "data" / "corpus" / "nq-open-oracle.jsonl.gz")
    p.add_argument("--requests", type=int, default=1000, help="single-query requests per concurrency level (at most 100 x concurrency)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="loads per server and level, alternating servers (the median is reported)")
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hnsw-vectors", type=int, default=200_000, help="vectors in the HNSW index (its build is the slow one)")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-index-types", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.cmd == "baseline-serve":
        serve_baseline(args.index, args.port, args.index_type)
        return
    report: dict = {}
    ensure_index(args.index, args.oracle)
    report["hit_at_3"] = hit_at_3(args.index, args.oracle)
    if not args.skip_serving:
        report["serving"] = serving(args.index, args.oracle, args.requests, args.concurrency, args.rounds)
    if not args.skip_index_types:
        report["index_types"] = index_types(args.vectors, args.dim, min(args.hnsw_vectors, args.vectors))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
