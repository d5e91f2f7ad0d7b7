"""``sap train-sft``: the checks and arguments (fast), then LLaMA-Factory for real on a tiny model (slow).

The slow tests run in the core venv and drive LLaMA-Factory as the command does: as
subprocesses with the SFT environment's executables (``.venv-sft``, created by ``make test``
through ``make setup-sft``). They fail, not skip, when that environment is missing.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sap import envs
from sap.cli import app
from sap.rules.config import LLAMAFACTORY_OWNED, ConfigError, load_config
from sap.stages import train_sft as ts
from sap.stages.prepare_sft import DATA_FILE, DATASET_INFO_FILE, dataset_info

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper" / "nq_qwen2.5-3b.yaml"
runner = CliRunner()


def write_data(data_dir: Path, records) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DATA_FILE).write_text(json.dumps(records))
    (data_dir / DATASET_INFO_FILE).write_text(json.dumps(dataset_info()))
    return data_dir


def fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


SAMPLE = {"instruction": "Question: who?\n", "input": "", "output": "<think> t </think> <answer> a </answer>"}


# --- arguments ---------------------------------------------------------------------------------


def test_paper_config_gives_the_papers_llamafactory_recipe(tmp_path):
    cfg = load_config(PAPER, [f"run_root={tmp_path}", "sft.llamafactory={preprocessing_num_workers: 16, val_size: 0.01}"])
    paths = ts.SFTPaths.for_config(cfg)
    args = ts.train_args(cfg, tmp_path / "m", paths)
    assert {k: args[k] for k in ("stage", "finetuning_type", "lora_target", "lora_rank", "lora_alpha", "template")} == {
        "stage": "sft",
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "lora_alpha": 16,
        "template": "qwen",
    }
    assert (args["learning_rate"], args["num_train_epochs"], args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (
        1e-4,
        1.0,
        2,
        4,
    )
    assert args["fp16"] is True and args["bf16"] is False
    assert args["report_to"] == "wandb"
    assert args["dataset"] == "sap_iterative_sft" and args["dataset_dir"] == str(tmp_path.resolve() / "nq_qwen2.5-3b" / "sft" / "data")
    assert args["output_dir"] == str(tmp_path.resolve() / "nq_qwen2.5-3b" / "sft" / "adapter")
    assert args["preprocessing_num_workers"] == 16 and args["val_size"] == 0.01  # pass-through


@pytest.mark.parametrize("key", sorted(LLAMAFACTORY_OWNED))
def test_passthrough_cannot_move_what_sap_owns(key):
    with pytest.raises(ConfigError, match=f"sft\\.llamafactory\\.{key} \\(set by"):
        load_config(None, [f"sft.llamafactory={{{key}: x}}"])


def test_passthrough_conflict_names_both_keys():
    """`--set sft.llamafactory='{learning_rate: 0.5}'` used to train at 0.5 while config.yaml said 1e-4."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sft.llamafactory={learning_rate: 0.5}"])
    assert "sft.llamafactory.learning_rate" in str(e.value) and "sft.learning_rate" in str(e.value)


def test_every_argument_sap_writes_is_owned_or_a_fixed_setting(tmp_path):
    """A key train_args writes from the config is in LLAMAFACTORY_OWNED (so no pass-through can
    shadow it); the rest are sap's fixed settings, which a pass-through may change."""
    cfg = load_config(None, ["sft.max_steps=3", "sft.deepspeed=z2"])
    args = ts.train_args(cfg, tmp_path, ts.SFTPaths.for_config(cfg), tmp_path / "ds.json")
    fixed = {"trust_remote_code", "stage", "finetuning_type", "overwrite_cache", "plot_loss"}
    assert set(args) - fixed == set(LLAMAFACTORY_OWNED) - {"resume_from_checkpoint", "overwrite_output_dir"}


@pytest.mark.parametrize(("backend", "report_to"), [("none", "none"), ("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_tracking_backend_maps_to_report_to_and_wandb_env(tmp_path, monkeypatch, backend, report_to):
    for var in ("WANDB_MODE", "WANDB_PROJECT", "NPROC_PER_NODE", "FORCE_TORCHRUN"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, [f"tracking.backend={backend}", "tracking.project=p1", f"run_root={tmp_path}"])
    paths = ts.SFTPaths.for_config(cfg)
    assert ts.train_args(cfg, tmp_path, paths)["report_to"] == report_to
    env = ts.subprocess_env(cfg, ts.SFTEnvironment(tmp_path / "venv" / "bin" / "python", {}), paths)
    assert env["PATH"].split(":")[0] == str(tmp_path / "venv" / "bin")
    assert (env.get("WANDB_MODE"), env.get("WANDB_PROJECT")) == (("offline", "p1") if backend == "wandb" else (None, None))
    assert "FORCE_TORCHRUN" not in env


def test_launcher_variables_exported_by_the_user_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("NNODES", "4")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    cfg = load_config(None, ["sft.master_addr=node1"])
    env = ts.subprocess_env(cfg, ts.SFTEnvironment(tmp_path / "python", {}), ts.SFTPaths.for_config(cfg))
    assert (env["NNODES"], env["MASTER_ADDR"]) == ("4", "node1")


def test_multi_gpu_goes_through_llamafactorys_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    cfg = load_config(
        None, ["sft.nproc_per_node=8", "sft.nnodes=2", "sft.node_rank=1", "sft.master_addr=10.0.0.1", "sft.master_port=29500"]
    )
    env = ts.subprocess_env(cfg, ts.SFTEnvironment(tmp_path / "python", {}), ts.SFTPaths.for_config(cfg))
    assert {k: env[k] for k in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "8",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }


def test_deepspeed_preset_is_written_and_passed(tmp_path):
    cfg = load_config(None, ["sft.deepspeed=z3_offload", f"run_root={tmp_path}"])
    paths = ts.SFTPaths.for_config(cfg)
    ds = ts.resolve_deepspeed(cfg.sft.deepspeed, paths.sft_dir)
    conf = json.loads(ds.read_text())
    assert conf["zero_optimization"]["stage"] == 3 and conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["train_micro_batch_size_per_gpu"] == "auto"
    assert ts.train_args(cfg, tmp_path, paths, ds)["deepspeed"] == str(ds)
    with pytest.raises(ts.SFTError, match="no such file"):
        ts.resolve_deepspeed("z9", paths.sft_dir)


# --- checks before training --------------------------------------------------------------------


def test_missing_model_says_offline_and_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ts.SFTError) as e:
        ts.resolve_model("Qwen/Qwen2.5-3B-Instruct")
    assert "not in the Hugging Face cache" in str(e.value) and "model.path" in str(e.value)
    with pytest.raises(ts.SFTError, match=r"'/no/such/model': no such folder \(set model.path"):
        ts.resolve_model("/no/such/model")
    with pytest.raises(ts.SFTError, match=r"no config\.json"):
        ts.resolve_model(str(tmp_path))
    snap = fake_model_dir(tmp_path / "hub" / "models--Qwen--Qwen2.5-3B-Instruct" / "snapshots" / "abc")
    assert ts.resolve_model("Qwen/Qwen2.5-3B-Instruct") == snap


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "the dataset is empty"),
        ({"a": 1}, "expected a JSON list"),
        ([SAMPLE, {"instruction": "q", "output": "o"}], r"record 1: column 'input' missing"),
        ([{"prompt": "q", "input": "", "output": "o"}], r"record 0: column 'instruction' missing"),
        ([{**SAMPLE, "output": 3}], r"record 0: column 'output' not a string"),
        ([{**SAMPLE, "output": "  "}], r"record 0: column 'output' is empty"),
    ],
)
def test_bad_dataset_is_named_before_training(tmp_path, records, message):
    data_dir = write_data(tmp_path / "data", records)
    with pytest.raises(ts.SFTError, match=message) as e:
        ts.check_dataset(data_dir)
    assert str(data_dir / DATA_FILE) in str(e.value)


def test_dataset_not_json_or_absent(tmp_path):
    with pytest.raises(ts.SFTError, match="run `sap prepare-sft` first"):
        ts.check_dataset(tmp_path)
    (tmp_path / DATA_FILE).write_text('[{"instruction": ')
    with pytest.raises(ts.SFTError, match="not valid JSON"):
        ts.check_dataset(tmp_path)


def test_missing_environment_names_the_make_target(tmp_path):
    with pytest.raises(envs.EnvironmentMissing, match="make setup-sft"):
        envs.resolve_python(str(tmp_path / "nope" / "bin" / "python"), "sft")


def test_cli_fails_before_training_with_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    base = ["train-sft", "--set", f"run_root={tmp_path / 'runs'}", "--set", "experiment=e"]
    res = runner.invoke(app, [*base, "--set", "model.path=Org/absent-model"])
    assert res.exit_code == 2 and "Org/absent-model" in res.output and "Traceback" not in res.output
    model = fake_model_dir(tmp_path / "model")
    res = runner.invoke(app, [*base, "--set", f"model.path={model}"])
    assert res.exit_code == 2 and "sap prepare-sft" in res.output
    write_data(tmp_path / "runs" / "e" / "sft" / "data", [SAMPLE])
    res = runner.invoke(app, [*base, "--set", f"model.path={model}", "--set", f"environments.sft_python={tmp_path}/none/python"])
    assert res.exit_code == 2 and "make setup-sft" in res.output
    assert not (tmp_path / "runs" / "e" / "sft" / "adapter").exists()


def test_output_dir_holding_another_run(tmp_path):
    cfg = load_config(None, [f"run_root={tmp_path}"])
    paths = ts.SFTPaths.for_config(cfg)
    write_data(paths.data_dir, [SAMPLE])
    fp = ts.fingerprint(ts.train_args(cfg, tmp_path, paths), paths.data_dir / DATA_FILE)
    assert ts.plan_output_dir(paths, fp, resume=False, overwrite=False) is None
    with pytest.raises(ts.SFTError, match="holds no run to resume"):
        ts.plan_output_dir(paths, fp, resume=True, overwrite=False)
    paths.adapter.mkdir(parents=True)
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ts.SFTError, match="not from a sap run"):
        ts.plan_output_dir(paths, fp, resume=False, overwrite=False)
    assert ts.plan_output_dir(paths, fp, resume=False, overwrite=True) is None
    (paths.adapter / ts.RUN_FILE).write_text(json.dumps(fp))
    with pytest.raises(ts.SFTError, match="already holds this run"):
        ts.plan_output_dir(paths, fp, resume=False, overwrite=False)
    with pytest.raises(ts.SFTError, match="no checkpoint"):
        ts.plan_output_dir(paths, fp, resume=True, overwrite=False)
    for n in (4, 12, 8):
        (paths.adapter / f"checkpoint-{n}").mkdir()
    assert ts.plan_output_dir(paths, fp, resume=True, overwrite=False) == paths.adapter / "checkpoint-12"
    other = load_config(None, [f"run_root={tmp_path}", "sft.learning_rate=0.5"])
    fp2 = ts.fingerprint(ts.train_args(other, tmp_path, paths), paths.data_dir / DATA_FILE)
    with pytest.raises(ts.SFTError, match=r"different run \(it differs in: learning_rate \(0.0001 -> 0.5\)\)"):
        ts.plan_output_dir(paths, fp2, resume=True, overwrite=False)
    write_data(paths.data_dir, [SAMPLE, SAMPLE])
    fp3 = ts.fingerprint(ts.train_args(cfg, tmp_path, paths), paths.data_dir / DATA_FILE)
    with pytest.raises(ts.SFTError, match="differs in: the training data"):
        ts.plan_output_dir(paths, fp3, resume=False, overwrite=False)


def test_trainer_log_is_read_incrementally_and_a_torn_line_waits(tmp_path):
    log = tmp_path / ts.TRAINER_LOG
    rows, off = ts.read_trainer_log(log)
    assert (rows, off) == ([], 0)
    log.write_text(
        '{"current_steps": 1, "total_steps": 4, "loss": 2.5, "remaining_time": "0:00:09"}\n{"current_steps": 2, "total_steps": 4, "lo'
    )
    state = ts.TrainProgress()
    rows, off = ts.read_trainer_log(log, 0)
    state.update(rows)
    assert (state.step, state.total_steps, state.losses, state.remaining) == (1, 4, [(1, 2.5)], "0:00:09")
    with log.open("a") as f:
        f.write('ss": 2.0, "remaining_time": "0:00:05"}\n')
    rows, off = ts.read_trainer_log(log, off)
    state.update(rows)
    assert (state.step, state.losses[-1], state.remaining, off) == (2, (2, 2.0), "0:00:05", log.stat().st_size)


# --- for real: prepare-sft -> LLaMA-Factory LoRA on a tiny Qwen2 -> merged model ---------------


def tagged_trajectories(data_dir: Path, path: Path, n: int = 8) -> Path:
    """Search-R1-style trajectories built from real NQ questions and their gold passages."""
    with gzip.open(data_dir / "corpus" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f, path.open("w") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            ctx = r["ctxs"][0]
            traj = (
                f"<think> I need to look up: {r['question']} </think> <search> {r['question']} </search>"
                f'<information> Doc 1(Title: "{ctx["title"]}") {ctx["text"][:300]} </information>'
                f"<think> The passage answers it. </think> <answer> {r['answers'][0]} </answer>"
            )
            out.write(json.dumps({"question": r["question"], "golden_answers": r["answers"], "trajectory": traj}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, data_dir):
    """prepare-sft then train-sft through the CLI, as a user runs them."""
    root = tmp_path_factory.mktemp("sft-run")
    cfg_file = root / "exp.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "experiment": "tiny",
                "run_root": str(root / "runs"),
                "model": {"path": str(tiny_model), "chat_template": "qwen"},
                "sft": {
                    "precision": "fp32",
                    "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 1,
                    "num_train_epochs": 3,
                    "learning_rate": 5.0e-3,
                    "lr_scheduler_type": "constant",
                    "warmup_ratio": 0.0,
                    "logging_steps": 1,
                    "save_steps": 6,
                    "cutoff_len": 1024,
                },
            }
        )
    )
    trajectories = tagged_trajectories(data_dir, root / "teacher.jsonl")
    res = runner.invoke(app, ["prepare-sft", str(trajectories), "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-sft", "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    return cfg_file, root / "runs" / "tiny" / "sft"


def sft_python() -> Path:
    python = REPO / ".venv-sft" / "bin" / "python"
    if not python.is_file():
        pytest.fail("the SFT environment .venv-sft is missing: `make setup-sft` (make test creates it)")
    return python


def test_samples_used_follows_llamafactory_max_samples():
    assert ts.samples_used({}, 1084) == 1084
    assert ts.samples_used({"max_samples": 96}, 1084) == 96  # the demo: 96 of 1,084
    assert ts.samples_used({"max_samples": 2000}, 1084) == 1084


@pytest.mark.slow
@pytest.mark.sft_env
def test_tiny_model_loads_in_the_sft_environment(tiny_model):
    """The tiny model is saved by the core venv's transformers; LLaMA-Factory's is older."""
    from transformers import AutoTokenizer

    script = (
        "import json, sys\nfrom transformers import AutoConfig, AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); c = AutoConfig.from_pretrained(sys.argv[1])\n"
        "m = [{'role': 'user', 'content': 'who?'}]\n"
        "print(json.dumps([type(t).__name__, t.eos_token, t.pad_token, c.model_type, c.vocab_size,"
        " t.apply_chat_template(m, tokenize=False, add_generation_prompt=True), t('<|im_start|>user who').input_ids]))\n"
    )
    out = subprocess.run([str(sft_python()), "-c", script, str(tiny_model)], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = tok.apply_chat_template([{"role": "user", "content": "who?"}], tokenize=False, add_generation_prompt=True)
    assert got == ["Qwen2Tokenizer", "<|im_end|>", "<|endoftext|>", "qwen2", len(tok), chat, tok("<|im_start|>user who").input_ids]


@pytest.mark.slow
@pytest.mark.sft_env
def test_train_sft_trains_the_adapter_and_merges(sft_run, tiny_model):
    _, sft = sft_run
    sft_python()
    summary = json.loads((sft / "summary.json").read_text())
    log = [json.loads(line) for line in (sft / "adapter" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert summary["steps"] == summary["total_steps"] == log[-1]["current_steps"] == 12  # 16 samples / 4 x 3 epochs
    assert summary["samples"] == summary["samples_in_data"] == 16  # no max_samples: all of them
    assert losses[-1] < losses[0] and (summary["first_loss"], summary["final_loss"]) == (losses[0], losses[-1])
    assert summary["merged"] and summary["paths"]["merged"] == str(sft / "merged")
    assert summary["wall_time_s"] > 0 and summary["versions"]["llamafactory"] == "0.9.5"

    written = yaml.safe_load((sft / "llamafactory_train.yaml").read_text())
    assert written["model_name_or_path"] == str(tiny_model) and written["template"] == "qwen" and written["lora_target"] == "all"
    assert json.loads((sft / "data" / "dataset_info.json").read_text()) == dataset_info()
    adapter_cfg = json.loads((sft / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        adapter_cfg["target_modules"]
    )
    assert (sft / "adapter" / "adapter_model.safetensors").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (sft / "merged" / name).is_file(), name
    assert not (sft / "merged" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.sft_env
def test_merged_model_generates_and_differs_from_the_base(sft_run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, sft = sft_run
    sample = json.loads((sft / "data" / DATA_FILE).read_text())[0]
    outputs, logits = {}, {}
    for name, path in (("base", tiny_model), ("merged", sft / "merged")):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert tok.chat_template and model.config.model_type == "qwen2"
        enc = tok.apply_chat_template(
            [{"role": "user", "content": sample["instruction"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            logits[name] = model(**enc).logits[0, -1]
            out = model.generate(**enc, max_new_tokens=16, do_sample=False)
        outputs[name] = tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert outputs["merged"] != outputs["base"]
    assert not torch.allclose(logits["merged"], logits["base"], atol=1e-3)
    # trained on step-wise actions that all open with <think>: the merged model has learned it
    assert outputs["merged"].lstrip().startswith("<think>")


@pytest.mark.slow
@pytest.mark.sft_env
def test_rerun_is_refused_and_resume_continues_from_the_last_checkpoint(sft_run):
    cfg_file, sft = sft_run
    res = runner.invoke(app, ["train-sft", "--config", str(cfg_file)])
    assert res.exit_code == 2 and "already holds this run" in res.output
    res = runner.invoke(app, ["train-sft", "--config", str(cfg_file), "--set", "sft.learning_rate=0.1"])
    assert res.exit_code == 2 and "holds a different run" in res.output and "learning_rate" in res.output
    res = runner.invoke(app, ["train-sft", "--config", str(cfg_file), "--set", "sft.precision=fp16"])  # CI machines have no GPU
    assert res.exit_code == 2 and "sft.precision=fp16 needs a GPU" in res.output

    # Simulate a crash after step 6: drop the last checkpoint and the log lines after it.
    adapter = sft / "adapter"
    shutil.rmtree(adapter / "checkpoint-12")
    log = adapter / "trainer_log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["current_steps"] <= 6))
    res = runner.invoke(app, ["train-sft", "--config", str(cfg_file), "--resume", "--no-merge"])
    assert res.exit_code == 0, res.output
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["resumed_from"] == str(adapter / "checkpoint-6") and summary["merged"] is False and summary["steps"] == 12
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["current_steps"] for r in rows if "loss" in r] == list(range(1, 13))  # 1-6 kept, 7-12 trained again
    assert summary["first_loss"] == rows[0]["loss"] and summary["final_loss"] == [r for r in rows if "loss" in r][-1]["loss"]
