"""algos/prm.py: the Monte Carlo step labels, the loss and the aggregations by hand; a run's plumbing, 2 processes
against 1."""
import json
import math

import pytest
import torch
from util import head, metrics, run

from algos import prm
from common.template import step_ends


def test_mc_labels_by_hand():
    reached = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert prm.mc_labels(reached).tolist() == [0.75, 0.0, 1.0]
    assert prm.mc_labels(reached, hard=True).tolist() == [1.0, 0.0, 1.0]


def test_prm_loss_by_hand():
    # -(1/S)[0.5 log σ(0) + 0.5 log(1 - σ(0)) + log σ(2)], S = 4 steps in the whole batch
    loss = prm.prm_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.5, 1.0]), 4)
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 4, rel=1e-6)


def test_step_ends_and_exact_labels(tok):
    comp = tok("12+3=15\n15-4=10<|im_end|>", add_special_tokens=False)["input_ids"]
    assert step_ends(tok, comp) == [7, len(comp) - 1]  # the line break, and the end-of-turn token
    assert prm.exact_labels("12+3=15\n15-4=10", ["12+3=15", "15-4=11"]) == [1.0, 0.0]
    assert prm.exact_labels("12+3=12\n12-4=8", ["12+3=15", "15-4=11"]) == [0.0, 0.0]  # wrong from the first step


def test_monte_carlo_labels_of_a_planted_case(tok, monkeypatch):
    """One prompt, whose sampled solution gets its second step wrong; of the 4 rollouts after its first step, 2
    reach the answer: labels (2/4, 0), hard (1, 0)."""
    from types import SimpleNamespace

    from common.template import encode_prompt
    ids = encode_prompt(tok, [{"role": "user", "content": "What is 12+3-4?"}])
    solution = "12+3=15\n15-4=10<|im_end|>"
    rollouts = ["15-4=11<|im_end|>", "15-4=11<|im_end|>", "15-4=10<|im_end|>", "15-4=12<|im_end|>"]

    def planted(policy, prompts, G, tok_, cfg, device):
        texts = [solution] * len(prompts) if G == 1 else rollouts * len(prompts)
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, rows))
        comp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
        return comp, mask, mask.any(-1)

    monkeypatch.setattr(prm, "generate", planted)
    args = SimpleNamespace(gen_batch_size=8, rollouts=4, seed=0, hard_labels=False)
    recs = [{"ids": ids, "answer": "11"}]
    (s,) = prm.label(None, recs, tok, None, args, torch.device("cpu"))
    assert tok.decode(s["comp"]) == solution and s["labels"] == [0.5, 0.0]
    args.hard_labels = True
    assert prm.label(None, recs, tok, None, args, torch.device("cpu"))[0]["labels"] == [1.0, 0.0]


def test_a_run_labels_trains_and_matches_on_two_processes(sft_run, tmp_path):
    """Labelling and training end to end from the SFT model on the multi-step prompts, the same on 2 processes (each
    labelling its share, gathered) as on 1."""
    common = ["--model", sft_run, "--data", head("chain_rl.jsonl", tmp_path / "p.jsonl", 64), "--rollouts", 2,
              "--eval_data", head("chain_eval.jsonl", tmp_path / "e.jsonl", 16), "--gen_batch_size", 16,
              "--max_steps", 3, "--log_every", 1, "--eval_every", 0, "--save_every", 0]
    run("prm", "--output_dir", tmp_path / "one", "--batch_size", 8, *common)
    run("prm", "--output_dir", tmp_path / "two", "--batch_size", 4, *common, nproc=2)
    labels = [[json.loads(line) for line in open(tmp_path / d / "labels.jsonl")] for d in ("one", "two")]
    assert len(labels[0]) == 64 and labels[0] == labels[1]
    assert all(len(r["labels"]) == r["solution"].count("\n") + 1 and all(0 <= y <= 1 for y in r["labels"])
               for r in labels[0])
    one, two = ([m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two"))
    assert len(one) == len(two) == 3 and all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(one, two))
    assert "eval/step_accuracy" in one[-1] and 0 < one[-1]["eval/step_majority"] <= 1
    from transformers import AutoModelForTokenClassification
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "one").config.num_labels == 1


# The PRM learning test's bounds, below the worst of seeds 0-2 x three kernel paths with a margin (the measured spread:
# docs/results.md, "Process reward models and best-of-N")
AUC_FLOOR, AUC_GAIN = 0.6, 0.05


def test_the_prm_learns_to_rank_right_steps_above_wrong_ones(sft_chain_run, tmp_path):
    """From the multi-step SFT model, 512 of its solutions labelled by 8 rollouts a step and 100 steps of training:
    the held-out steps' AUROC (a right step scored above a wrong one; 1/2 by chance) rises above the untrained head's.
    Calibrated over seeds 0-2 x kernel paths avx512 / avx2 / default, runs/toy built under each (docs/results.md)."""
    run("prm", "--model", sft_chain_run, "--num_prompts", 512, "--max_steps", 100, "--eval_every", 100,
        "--log_every", 50, "--save_every", 0, "--output_dir", tmp_path)
    start, end = (m for m in metrics(tmp_path) if "eval/step_auc" in m)
    assert end["eval/step_auc"] > AUC_FLOOR
    assert end["eval/step_auc"] > start["eval/step_auc"] + AUC_GAIN
