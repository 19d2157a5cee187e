"""Online DPO: pair construction by hand, the loss is dpo.py's, a batch without pairs, bad input, and learning."""
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file
from util import GRAD_REL, habit_outcome, head, metrics, run

from algos import dpo, online_dpo
from algos.online_dpo import make_pairs

T = torch.tensor


# ---- pairs from two samples of each prompt ----

def test_make_pairs_drops_ties_and_orients_by_reward():
    # prompt 0: a right, b wrong; 1: b right; 2 and 3: ties (both right, both wrong); 4: a reward model's scores
    kept, a_chosen = make_pairs(T([1.0, 0.0, 1.0, 0.0, 0.7]), T([0.0, 1.0, 1.0, 0.0, 0.9]))
    assert kept.tolist() == [0, 1, 4] and a_chosen.tolist() == [True, False, False]


def test_identical_samples_are_a_tie_whatever_their_scores():
    # a reward model may score two identical texts a rounding error apart: still no preference
    kept, a_chosen = make_pairs(T([0.3, 0.5]), T([0.3000001, 0.1]), identical_B=T([True, False]))
    assert kept.tolist() == [1] and a_chosen.tolist() == [True]


def test_all_ties_give_no_pair_and_an_exact_zero_loss():
    kept, a_chosen = make_pairs(T([1.0, 0.0, 1.0]), T([1.0, 0.0, 1.0]))
    assert kept.numel() == 0 and a_chosen.numel() == 0
    # a micro-batch without a pair forwards one tie and slices it away (M = 0): its loss is an empty sum, exactly 0,
    # and its gradient exactly 0, however many pairs the rest of the global batch holds
    logps = T([-3.0, -5.0], requires_grad=True)  # the tie's two samples through the policy
    logps_c, logps_r = (x[:0] for x in logps.chunk(2))
    ref_c, ref_r = (x[:0] for x in T([-4.0, -4.0]).chunk(2))
    loss, rewards_c, rewards_r = online_dpo.dpo_loss(logps_c, logps_r, ref_c, ref_r, 0.1, n_pairs=7)
    loss.backward()
    assert loss.item() == 0.0 and rewards_c.numel() == rewards_r.numel() == 0
    assert torch.equal(logps.grad, torch.zeros(2))


# ---- the loss is dpo.py's ----

def test_loss_is_dpo_py_s():
    # copied, not re-derived: a fix to one is a fix to both (the log-probs both take from common.logps)
    assert inspect.getsource(online_dpo.dpo_loss) == inspect.getsource(dpo.dpo_loss)
    g = torch.Generator().manual_seed(0)
    lc, lr, rc, rr = (-10 * torch.rand(6, generator=g) for _ in range(4))
    for kw in ({}, {"label_smoothing": 0.1}, {"dpop_lambda": 5.0}):
        ours, theirs = online_dpo.dpo_loss(lc, lr, rc, rr, 0.1, 6, **kw), dpo.dpo_loss(lc, lr, rc, rr, 0.1, 6, **kw)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), kw


def test_a_batch_without_any_pair_runs_and_changes_nothing(base, tmp_path):
    """Answers no completion can match: every reward is 0, every pair a tie. The run logs loss 0 and no pair
    metrics, takes no optimizer step, and saves the model it started from."""
    path = tmp_path / "impossible.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": "never"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    run("online_dpo", "--model", base, "--data", path, "--batch_size", 2, "--grad_accum", 2, "--max_steps", 2,
        "--log_every", 1, "--save_every", 0, "--output_dir", out)
    m = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in m] == [1, 2]
    assert all(r["loss"] == 0.0 and r["frac_kept"] == 0.0 and r["reward/mean"] == 0.0 for r in m)
    assert not any("rewards/accuracy" in r or "kl" in r for r in m)
    start, end = load_file(f"{base}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)


def test_two_processes_give_the_same_loss(sft_run, tmp_path):
    """4 prompts a step: 1 process with 2 micro-batches of 2 prompts against 2 processes with 2 prompts each. Samples
    are seeded per micro-batch, and M counts the pairs of the global batch. (Seed 0 here: one step keeps a single
    pair, so one process forwards a tie and slices it away, the path FSDP needs.)"""
    common = ["--model", sft_run, "--eval_data", head("eval.jsonl", tmp_path / "eval_16.jsonl", 16), "--max_steps", 4,
              "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--batch_size", 2, "--lr", 1e-3]
    run("online_dpo", "--output_dir", tmp_path / "one", "--grad_accum", 2, *common)
    run("online_dpo", "--output_dir", tmp_path / "two", *common, nproc=2)
    one, two = [[m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two")]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["reward/mean"] == b["reward/mean"] and a["frac_kept"] == b["frac_kept"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)  # float summation order differs (2e-6 seen)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)
    assert any(m["loss"] > 1e-3 for m in one)  # the comparison is not of zeros


# ---- bad input (the argument checks are in test_bad_input.py) ----

def test_prompt_without_answer_names_file_and_line(base, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SystemExit, match=f"^error: {path}:2: missing field 'answer'"):
        online_dpo.main(online_dpo.parse_args(["--model", base, "--data", str(path),
                                               "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


# ---- learning ----

def test_online_dpo_learns_to_drop_the_habit(sft_run, tok, tmp_path):
    """The defaults from the SFT model: pairs sampled from the policy and labelled by the verifier remove the SFT
    habit of restating the first number (common/toy.py): its teacher-forced probability on the held-out subtractions
    recedes, and greedy accuracy holds (as asserted for GRPO in test_rl)."""
    run("online_dpo", "--model", sft_run, "--output_dir", tmp_path / "out", "--save_every", 0)
    acc, echo = habit_outcome("online_dpo", sft_run, tmp_path / "out", tok)
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default), one thread,
    # each from that run's SFT model: P(echo) fell to 0.31-0.74 of its start (worst: default, seed 0); held-out
    # accuracy changed by -0.004 to +0.152, too little on some runs to assert a rise.
    assert echo[1] < 0.85 * echo[0] and acc[-1] > acc[0] - 0.05
    keys = ("loss", "grad_norm", "rewards/margin", "rewards/accuracy", "frac_kept", "reward/mean", "kl")
    assert all(k in metrics(tmp_path / "out")[-1] for k in keys)
