"""``sap train-ppo`` on CPU, for real: VeRL's own ``verl.trainer.main_ppo`` (the v1 trainer a GPU
node runs) with sap's CPU mode (:mod:`sap.rl.cpu`), 2 PPO steps on 4 questions against the real
retriever, interrupted after step 1 with Ctrl-C and resumed; then the checkpoints, metrics,
rollouts, the rollout server's weights and the merged model are checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sap.envs import _alive, descendants

from .conftest import QUESTIONS, write_questions

pytestmark = [pytest.mark.rl_env, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 1200


def _sap(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sap", "train-ppo", *args]


def _fingerprint_checkpoint(actor_dir: Path) -> dict[str, list[float]]:
    """The actor's fp32 weights as VeRL saved them (FSDP2 DTensors, one rank)."""
    import torch

    from sap.rl.cpu import weights_fingerprint

    state = torch.load(actor_dir / "model_world_size_1_rank_0.pt", weights_only=False, map_location="cpu")
    return weights_fingerprint({k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()})


def _same(a: dict[str, list[float]], b: dict[str, list[float]], tol: float = 1e-6) -> bool:
    shared = set(a) & set(b)
    assert len(shared) >= len(a) - 1, f"tensor names differ: {sorted(set(a) ^ set(b))}"  # lm_head is tied in the server's model
    return all(abs(a[k][i] - b[k][i]) <= tol * max(1.0, abs(a[k][i])) for k in shared for i in (0, 1))


def test_two_ppo_steps_on_cpu_interrupted_and_resumed(tmp_path: Path, searching_model: Path, core_retriever_url: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sap.rl.cpu import weights_fingerprint

    questions = write_questions(tmp_path / "questions.jsonl")
    run = tmp_path / "runs" / "ppo-cpu"
    ppo = run / "ppo"
    args = [
        "--init",
        "base",
        *(
            a
            for kv in (
                f"run_root={tmp_path / 'runs'}",
                "experiment=ppo-cpu",
                f"model.path={searching_model}",
                f"retriever.url={core_retriever_url}",
                f"environments.rl_python={sys.executable}",
                "tracking.backend=tensorboard",
                f"ppo.train_data={questions}",
                f"ppo.val_data={questions}",
                "ppo.device=cpu",
                "ppo.total_training_steps=2",
                "ppo.train_batch_size=4",
                "ppo.ppo_mini_batch_size=4",
                "ppo.ppo_micro_batch_size_per_gpu=2",
                "ppo.n_gpus_per_node=1",
                "ppo.agent_workers=1",
                "ppo.max_prompt_length=512",
                "ppo.max_turns=1",
                "ppo.max_response_length=24",
                "ppo.max_obs_length=64",
                "ppo.actor_lr=1e-3",  # large enough that an update visibly moves the weights
                "ppo.save_freq=1",
                "ppo.test_freq=-1",
            )
            for a in ("--set", kv)
        ),
    ]

    # run 1: Ctrl-C as soon as step 1's checkpoint is written
    marker = ppo / "checkpoints" / "latest_checkpointed_iteration.txt"
    proc = subprocess.Popen(_sap(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    tree: set[int] = set()
    while proc.poll() is None and time.monotonic() < deadline:
        tree |= set(descendants(proc.pid))
        if marker.is_file() and marker.read_text().strip():
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"sap train-ppo ended before step 1 was saved:\n{proc.stdout.read()[-4000:]}"
    assert marker.is_file(), f"no checkpoint after {STEP_TIMEOUT_S} s; see {ppo / 'train.log'}"
    tree |= set(descendants(proc.pid))
    os.kill(proc.pid, signal.SIGINT)
    out1, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out1[-3000:]
    assert "interrupted: VeRL, Ray and their processes were stopped" in out1
    time.sleep(1)
    left = [p for p in tree if _alive(p)]
    assert not left, f"processes left running after Ctrl-C: {left}"
    if marker.read_text().strip() != "1":  # step 2 finished before the signal landed: start again from step 1
        import shutil

        shutil.rmtree(ppo / "checkpoints" / "global_step_2")
        marker.write_text("1")

    # run 2: resumes from step 1 and finishes
    done = subprocess.run(_sap(args), cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + (ppo / "train.log").read_text()[-4000:]
    summary = json.loads((ppo / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["resumed_from"] == 1 and summary["steps"] == 2

    # checkpoints of both steps, actor and critic
    for step in (1, 2):
        for part in ("actor", "critic"):
            assert (ppo / "checkpoints" / f"global_step_{step}" / part).is_dir()

    # metrics: one row per step, with the losses, advantages, reward and sap's trajectory means
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("actor/pg_loss", "critic/vf_loss", "critic/advantages/mean", "critic/advantages/max", "critic/score/mean",
                    "actor/reward_kl_penalty", "response_length/mean", "sap/em", "sap/searches", "sap/turns",
                    "sap/retrieval_failures", "timing_s/step"):  # fmt: skip
            assert isinstance(r[key], int | float), (key, r.get(key))
    assert any(r["sap/searches"] > 0 for r in rows)
    assert list((ppo / "tensorboard").glob("events.out.tfevents.*"))

    # rollouts a user can read: the questions, with the retriever's <information> blocks
    for step in (1, 2):
        trajectories = [json.loads(line) for line in (ppo / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(trajectories) == len(QUESTIONS)
        assert {t["question"].rstrip("?") for t in trajectories} == {q["question"] for q in QUESTIONS}
    assert any("<information>" in t["response"] and "Doc 1(Title:" in t["response"] for t in trajectories)

    # the rollout server got the actor's weights after each update: first the initial model,
    # then exactly the weights saved at each step (a resumed run syncs step 1's first)
    synced = [json.loads(line) for line in (ppo / "rollout_weights.jsonl").read_text().splitlines()]
    initial = weights_fingerprint(dict(AutoModelForCausalLM.from_pretrained(searching_model).named_parameters()))
    step1 = _fingerprint_checkpoint(ppo / "checkpoints" / "global_step_1" / "actor")
    step2 = _fingerprint_checkpoint(ppo / "checkpoints" / "global_step_2" / "actor")
    assert _same(synced[0]["tensors"], initial)
    assert not _same(step1, initial) and not _same(step2, step1), "an update did not change the weights"
    assert _same(synced[-1]["tensors"], step2)
    assert any(_same(s["tensors"], step1) for s in synced[1:-1])

    # the merged model (ppo/merged) loads and generates
    tok = AutoTokenizer.from_pretrained(ppo / "merged")
    model = AutoModelForCausalLM.from_pretrained(ppo / "merged")
    ids = tok("Question: who wrote hamlet?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in out[0].tolist()
