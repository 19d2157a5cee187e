"""--resume continues exactly where a run stopped, in every training script (sft is killed mid-run in test_dist.py).

A run of 4 steps leaves behind its checkpoint from step 2; a second run started from a copy of that checkpoint with
--resume must end with the same weights, bit for bit: model, optimizer, scheduler, RNG, data position (and for PPO
the critic and the KL coefficient) all come back.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file
from util import head, metrics, run

CASES = {  # script -> its arguments beyond the shared ones (small data files, so that a run takes seconds)
    "rm": lambda t, sft, rm: ["--model", sft, "--data", head("prefs.jsonl", t / "p.jsonl", 64),
                              "--eval_data", head("prefs_eval.jsonl", t / "pe.jsonl", 8)],
    "dpo": lambda t, sft, rm: ["--model", sft, "--data", head("prefs.jsonl", t / "p.jsonl", 64),
                               "--eval_pairs", head("prefs_eval.jsonl", t / "pe.jsonl", 8)],
    "kto": lambda t, sft, rm: ["--model", sft, "--data", head("kto.jsonl", t / "k.jsonl", 64),
                               "--eval_pairs", head("prefs_eval.jsonl", t / "pe.jsonl", 8)],
    "simpo": lambda t, sft, rm: ["--model", sft, "--data", head("prefs.jsonl", t / "p.jsonl", 64),
                                 "--eval_pairs", head("prefs_eval.jsonl", t / "pe.jsonl", 8)],
    "grpo": lambda t, sft, rm: ["--model", sft, "--data", head("rl.jsonl", t / "r.jsonl", 64)],
    "rloo": lambda t, sft, rm: ["--model", sft, "--data", head("rl.jsonl", t / "r.jsonl", 64)],
    "remax": lambda t, sft, rm: ["--model", sft, "--data", head("rl.jsonl", t / "r.jsonl", 64)],
    "ppo": lambda t, sft, rm: ["--model", sft, "--reward_model", rm, "--data", head("rl.jsonl", t / "r.jsonl", 64),
                               "--batch_size", 8],
    "distill": lambda t, sft, rm: ["--model", sft, "--teacher", sft, "--mode", "on_policy"],
    # the labels are drawn again on resume, seeded by chunk: the same solutions and labels
    "prm": lambda t, sft, rm: ["--model", sft, "--data", head("chain_rl.jsonl", t / "c.jsonl", 32), "--rollouts", 2,
                               "--batch_size", 8, "--eval_data", head("chain_eval.jsonl", t / "ce.jsonl", 8)],
    # LoRA: the checkpoint holds the adapters alone; the reference is the policy with its adapters off
    "grpo-lora": lambda t, sft, rm: ["--model", sft, "--data", head("rl.jsonl", t / "r.jsonl", 64), "--lora_r", 4,
                                     "--beta", 0.04],
}


@pytest.mark.parametrize("script", [script for script in CASES if script != "ppo"])
def test_resume_reaches_the_same_weights(script, sft_run, tmp_path):
    resumes_exactly(script, sft_run, None, tmp_path)


def test_ppo_resume_reaches_the_same_weights(sft_run, rm_run, tmp_path):
    """PPO's case on its own: it alone needs the reward model, which the suite trains last."""
    resumes_exactly("ppo", sft_run, rm_run, tmp_path)


def resumes_exactly(script, sft_run, rm_run, tmp_path):
    shared = ["--max_steps", 4, "--save_every", 2, "--log_every", 1, "--eval_every", 0]
    args = CASES[script](tmp_path, sft_run, rm_run) + shared
    if script not in ("rm", "prm"):
        args += ["--eval_data", head("eval.jsonl", tmp_path / "e.jsonl", 8)]
    weights = "adapter_model.safetensors" if "lora" in script else "model.safetensors"
    script = script.split("-")[0]
    run(script, "--output_dir", tmp_path / "full", *args)
    (tmp_path / "resumed").mkdir()
    # as a kill after step 2 leaves it
    shutil.copytree(tmp_path / "full" / "checkpoint", tmp_path / "resumed" / "checkpoint")
    log = run(script, "--output_dir", tmp_path / "resumed", "--resume", "true", *args)
    assert "at step 2" in log.stdout + log.stderr
    w_full, w_res = (load_file(tmp_path / d / weights) for d in ("full", "resumed"))
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    losses = {d: [m["loss"] for m in metrics(tmp_path / d) if "loss" in m and m["step"] > 2]
              for d in ("full", "resumed")}
    assert len(losses["full"]) == 2 and losses["full"] == losses["resumed"]
