"""The ``sap`` command line: thin Typer wrappers over the importable stage functions.

Each command resolves its config with :func:`sap.rules.options.load` (the YAML file, then
``--set``, then its own flags as dotted keys: ``--limit 5`` is ``eval.limit=5``), calls one
stage function and prints what it returns. Errors are :class:`~sap.rules.errors.SapError`,
handled once by :class:`SapGroup`. ``sap retriever ...`` is :mod:`sap_retriever.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from sap.assets_cli import data_app, model_app
from sap.rules.config import dump_config
from sap.rules.errors import SapError
from sap.rules.options import ConfigOpt, SetOpt, load, opt, tty
from sap_retriever.cli import retriever_app


class SapGroup(TyperGroup):
    """The top-level group: a :class:`SapError` from any command becomes ``error: <message>`` and its
    exit code; Ctrl-C (or SIGTERM during a child process) exit 130, once the children are stopped."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SapError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=SapGroup,
    name="sap",
    help="sap, the search-agent pipeline: teach small LLMs to use a search engine (SFT then RL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show, explain or check an experiment config.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(retriever_app, name="retriever")  # the retrieval service's commands live in its package
app.add_typer(data_app, name="data")  # getting data and models in: sap.assets_cli
app.add_typer(model_app, name="model")


def warn(message: str) -> None:
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


# --- sap config / sap doctor ---------------------------------------------------------------


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    typer.echo(dump_config(load(config, set_)), nl=False)


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
    from sap.rules.config import get_value

    value = get_value(load(config, set_), key)
    typer.echo(json.dumps(value) if isinstance(value, dict | list) else value)


@config_app.command("explain")
def config_explain(key: Annotated[str, typer.Argument(help="Dotted key path (e.g. ppo.rollout_n) or a section (ppo).")] = "") -> None:
    """Type, default and help of a config key; for a section, its keys. Example: sap config explain ppo.rollout_n"""
    from sap.rules.config import explain_text

    typer.echo(explain_text(key))


@config_app.command("validate")
def config_validate(files: Annotated[list[Path], typer.Argument(help="Config files to check.")]) -> None:
    """Check config files; exits non-zero naming each bad key path."""
    from sap.rules.config import validate_files

    bad = validate_files(files, ok=lambda f: typer.echo(f"ok  {f}"), bad=lambda f, e: typer.secho(e, fg=typer.colors.RED, err=True))
    if bad:
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    gpus: Annotated[bool, typer.Option("--gpus", help="Only print how many CUDA GPUs the RL environment sees (for scripts).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """What each environment holds (versions, CUDA, GPUs) and whether each stage can run here."""
    from sap.stages.doctor import doctor, gpu_count, render

    cfg = load(config, set_)
    if gpus:
        return typer.echo(gpu_count(cfg))
    report = doctor(cfg)
    typer.echo(render(report))
    if report.failed:
        raise typer.Exit(1)


# --- the stages ----------------------------------------------------------------------------


@app.command("prepare-sft")
def prepare_sft_cmd(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Trajectory files. Default: sft.prepare.inputs.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: runs/<experiment>/sft/data")] = None,
    min_f1: Annotated[float | None, opt("sft.prepare.min_f1")] = None,
    require_search: Annotated[bool | None, opt("sft.prepare.require_search", "--require-search/--no-require-search")] = None,
    reject_phrase: Annotated[list[str] | None, opt("sft.prepare.reject_phrases", "--reject-phrase", help="Repeatable.")] = None,
    dedupe: Annotated[bool | None, opt("sft.prepare.dedupe", "--dedupe/--no-dedupe")] = None,
    alias: Annotated[list[str] | None, opt("sft.prepare.tag_aliases", "--alias", help="Tag alias NAME=TAG, repeatable.")] = None,
    keep_prompt: Annotated[bool | None, opt("sft.prepare.keep_prompt", "--keep-prompt/--rebuild-prompt")] = None,
    strict: Annotated[bool | None, opt("sft.prepare.strict", "--strict/--no-strict")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Teacher trajectories -> step-wise Alpaca samples for LLaMA-Factory (one per model action).

    Example:

        sap prepare-sft teacher.jsonl --out runs/demo/sft/data --min-f1 0.65 --require-search --reject-phrase "I remember" --dedupe
    """
    from sap.rules.config import pairs
    from sap.stages.prepare_sft import prepare_sft

    p = "sft.prepare."
    flags = {p + "inputs": inputs, p + "min_f1": min_f1, p + "require_search": require_search, p + "reject_phrases": reject_phrase}
    flags |= {p + "dedupe": dedupe, p + "keep_prompt": keep_prompt, p + "strict": strict}
    flags |= {f"{p}tag_aliases.{name}": tag for name, tag in pairs(alias, "--alias").items()}
    typer.echo(prepare_sft(load(config, set_, flags), out, progress=tty()).describe())


@app.command("collect")
def collect_cmd(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: collect.out (runs/<experiment>/collect)")] = None,
    limit: Annotated[int | None, opt("collect.limit", min=1)] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard earlier samples in the output folder and start over.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Teacher trajectories on the training questions, filtered the Always-Search way, ready for prepare-sft (docs/collect.md).

    Example:

        sap collect --config configs/paper/nq_qwen2.5-3b.yaml --set collect.limit=100
    """
    from sap.stages.collect import run_collect

    typer.echo(run_collect(load(config, set_, {"collect.limit": limit}), out, restart=restart, progress=tty()).describe())


@app.command("train-sft")
def train_sft_cmd(
    data: Annotated[Path | None, typer.Option("--data", help="prepare-sft output folder. Default: runs/<experiment>/sft/data")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace whatever the output folder holds.")] = False,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Merge the adapter into runs/<experiment>/sft/merged.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """LoRA SFT with LLaMA-Factory (in .venv-sft), then a merged model -> runs/<experiment>/sft/.

    Example:

        sap train-sft --config configs/paper/nq_qwen2.5-3b.yaml --set model.path=models/Qwen2.5-3B-Instruct
    """
    from sap.stages.train_sft import train_sft

    result = train_sft(load(config, set_), data_dir=data, resume=resume, overwrite=overwrite, merge=merge, progress=tty())
    typer.echo(result.describe())


@app.command("train-ppo")
def train_ppo_cmd(
    init: Annotated[str | None, opt("ppo.init", "--init")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Data, configs, VeRL's validation, the command; no GPU, no retriever.")
    ] = False,
    rollouts: Annotated[int, typer.Option(min=0, help="With --dry-run: play N questions for real on CPU -> ppo/cpu_rollouts.jsonl.")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Search-R1-style multi-turn PPO on VeRL (GAE + critic; GRPO and LoRA as options) -> runs/<experiment>/ppo/.

    Example:

        sap train-ppo --config configs/paper/nq_qwen2.5-3b.yaml --init sft --dry-run

        sap train-ppo --config configs/demo/tiny_cpu.yaml --dry-run --rollouts 4   # CPU: real agent-loop rollouts
    """
    from sap.stages.train_ppo import train_ppo

    typer.echo(train_ppo(load(config, set_, {"ppo.init": init}), dry_run=dry_run, rollouts=rollouts, echo=warn).describe())


@app.command("eval")
def eval_cmd(
    group: Annotated[list[str], typer.Option("--group", "-g", help="A group of eval.groups or 'all'; repeatable.")],
    limit: Annotated[int | None, opt("eval.limit")] = None,
    seed: Annotated[int | None, opt("eval.seed")] = None,
    engine: Annotated[str | None, opt("eval.engine")] = None,
    dataset: Annotated[Path | None, opt("eval.dataset")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard this group's earlier predictions instead of resuming.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate groups with the multi-turn search agent (needs the retriever; resumes) -> runs/<exp>/eval/<group>/.

    Example:

        sap eval --config configs/paper/nq_qwen2.5-3b.yaml --group all
    """
    from sap.stages.evaluate import evaluate

    cfg = load(config, set_, {"eval.limit": limit, "eval.seed": seed, "eval.engine": engine, "eval.dataset": dataset})
    evaluate(cfg, group, restart=restart, progress=tty(), on_group=typer.echo)


@app.command("report")
def report_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The paper's table (+ extra columns) and a bar chart of every evaluated group -> runs/<exp>/report.{md,png}."""
    from sap.stages.report import report

    md, png = report(load(config, set_))
    typer.echo(md.read_text(encoding="utf-8"))
    typer.echo(f"wrote {md} and {png}")


@app.command("score")
def score_cmd(
    predictions: Annotated[Path, typer.Option("--predictions", "-p", help="JSONL (golden_answers, prediction) or the paper's JSON list.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: n and the set's metrics.")] = False,
    metrics: Annotated[str, typer.Option("--metrics", help="sap (EM, SubEM, F1, ROUGE-L) or paper (compute_metrics.py's).")] = "sap",
) -> None:
    """Score an existing predictions file (see README: Metrics).

    Example:

        sap score --predictions runs/demo/eval/sft/predictions.jsonl --json
        sap score --metrics paper --predictions nq_eval_results.json --json
    """
    from sap.stages.score import describe, score_file

    typer.echo(describe(score_file(predictions, metrics), as_json, metrics))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
