"""algos/best_of_n.py: the judges' scores and picks by hand, accuracy at N by hand, and a search end to end."""
import json
import math

import pytest
import torch
from util import head, run

from algos import best_of_n as bon


def test_prm_scores_by_hand():
    s = torch.tensor([0.0, math.log(3), -math.log(3)])  # σ: 0.5, 0.75, 0.25
    scores = bon.prm_scores(s)
    assert scores["prm_min"] == pytest.approx(0.25)
    assert scores["prm_product"] == pytest.approx(0.5 * 0.75 * 0.25)
    assert scores["prm_last"] == pytest.approx(0.25)


def test_majority_pick_by_hand():
    assert bon.majority_pick(["5", "7", "5", None]) == 0
    assert bon.majority_pick(["7", "5", "5", "7"]) == 0  # a tie: the first solution with a top answer
    assert bon.majority_pick([None, "3", None, None]) == 1  # no number is no answer, however many lack one
    assert bon.majority_pick([None, None]) == 0
    assert bon.final_answer("12+3=15\n15-4=11") == "11" and bon.final_answer("no idea") is None


def test_accuracy_at_n_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.8, 0.1]])
    right = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert bon.accuracy_at(1, scores, right) == pytest.approx(3 / 8)  # every sample its own group: the mean
    # groups of 2: [0.1, 0.9] picks a wrong one, [0.5, 0.2] a wrong one; [0.3, 0.3] the first (right), [0.8, 0.1] wrong
    assert bon.accuracy_at(2, scores, right) == pytest.approx(1 / 4)
    assert bon.accuracy_at(4, scores, right) == pytest.approx(0.0)
    assert bon.accuracy_at(2, right, right) == pytest.approx(3 / 4)  # the verifier: right when any of the group is
    answers = [["5", "6", "6", "5"], ["4", "4", "4", "9"]]  # problem 0's answer is "5", problem 1's "4"
    right = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert bon.majority_accuracy(2, answers, right) == pytest.approx((1 + 0 + 1 + 1) / 4)  # ties: the first
    assert bon.majority_accuracy(4, answers, right) == pytest.approx((1 + 1) / 2)


def test_a_search_end_to_end(sft_chain_run, tmp_path):
    """ORM pairs written from the policy's own solutions, a PRM and an ORM trained for a few steps, and the search:
    at N = 1 every judge picks the one sample, so all agree with the sample accuracy; no judge beats the verifier."""
    pairs = tmp_path / "pairs.jsonl"
    prompts = head("chain_rl.jsonl", tmp_path / "p.jsonl", 128)
    run("best_of_n", "--policy", sft_chain_run, "--pairs_out", pairs, "--data", prompts, "--pairs_per_prompt", 8,
        "--gen_batch_size", 32)
    rows = [json.loads(line) for line in open(pairs)]
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    run("rm", "--model", sft_chain_run, "--data", pairs, "--output_dir", tmp_path / "orm", "--max_steps", 2,
        "--batch_size", 4, "--save_every", 0)
    run("prm", "--model", sft_chain_run, "--data", prompts, "--rollouts", 2, "--num_prompts", 16, "--batch_size", 8,
        "--max_steps", 2, "--eval_every", 0, "--save_every", 0, "--output_dir", tmp_path / "prm")
    run("best_of_n", "--policy", sft_chain_run, "--prm", tmp_path / "prm", "--orm", tmp_path / "orm", "--n", "1,2,4",
        "--data", head("chain_eval.jsonl", tmp_path / "e.jsonl", 16), "--output_dir", tmp_path / "bon")
    result = json.load(open(tmp_path / "bon" / "best_of_n.json"))
    acc = {name: {int(n): a for n, a in by_n.items()} for name, by_n in result["accuracy"].items()}
    assert set(acc) == {"prm_min", "prm_product", "prm_last", "orm", "majority", "verifier"}
    assert all(by_n[1] == pytest.approx(result["sample_accuracy"]) for by_n in acc.values())
    assert all(by_n[n] <= acc["verifier"][n] + 1e-9 for by_n in acc.values() for n in (1, 2, 4))
    assert acc["verifier"][1] <= acc["verifier"][2] <= acc["verifier"][4]
    assert (tmp_path / "bon" / "best_of_n.md").read_text().startswith("| judge |")


def test_discrimination_within_a_problem_and_pooled_by_hand():
    """A judge that knows only which problem is easy: perfect pooled order, no order within a problem."""
    scores = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]])
    right = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    d = bon.discrimination(scores, right)
    assert d["within"] == pytest.approx(0.5)  # ties within each problem
    # pooled: right scores {.9, .9, .9, .1}, wrong {.9, .1, .1, .1}: pairs won 3·3 + 0, tied 3·1 + 1·3, lost 0
    assert d["pooled"] == pytest.approx((9 + 0.5 * 6) / 16)
    assert bon.auroc(torch.tensor([0.2, 0.7]), torch.tensor([1.0, 1.0])) is None  # no wrong solution: undefined
    assert bon.discrimination(torch.tensor([[0.2, 0.7]]), torch.tensor([[0.0, 1.0]]))["within"] == 1.0
