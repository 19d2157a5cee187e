"""RFT (rejection-sampling fine-tuning): the best-of-n selection by hand; bad arguments; short runs (1 vs 2 processes,
resume); learning on the embedded task."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from util import GRAD_REL, habit_outcome, head, metrics, run

from algos import rft
from algos.rft import select_best

A, B = [1, 2, 3], [4, 5]  # the token ids of two prompts


def test_best_of_n_keeps_each_prompts_highest_reward():
    prompts = [A, A, A, B, B, B]  # a round's samples, each prompt's consecutive (the order does not matter)
    rewards = [0.1, 0.5, 0.9, -1.0, 0.3, 0.2]  # continuous, as a reward model gives
    assert select_best(prompts, ["a", "b", "c", "d", "e", "f"], rewards, -10.0) == [2, 4]
    assert select_best([B, A, B, A], ["a", "b", "c", "d"], [0.0, 2.0, 1.0, 3.0], -10.0) == [2, 3]  # interleaved


def test_ties_keep_the_first_in_sample_order():
    texts = ["w", "x", "y", "z"]
    assert select_best([A] * 4, texts, [0.0, 1.0, 1.0, 1.0], 1.0) == [1]  # three share the best: the first sampled
    assert select_best([A] * 4, texts, [1.0, 0.0, 0.0, 1.0], 1.0) == [0]


def test_min_reward_drops_prompts_whose_best_is_below_it():
    prompts, texts = [A, A, B, B], ["a", "b", "c", "d"]
    assert select_best(prompts, texts, [0.0, 0.0, 0.0, 1.0], 1.0) == [3]  # A's best is 0 < 1: A keeps nothing
    assert select_best(prompts, texts, [0.0, 0.0, 0.0, 1.0], 0.0) == [0, 3]  # r_min 0: A keeps its first best
    assert select_best(prompts, texts, [0.4, 0.1, 0.7, 0.5], 0.5) == [2]  # the best must reach r_min (0.4 < 0.5)
    assert select_best(prompts, texts, [0.0] * 4, 0.5) == []


def test_identical_completions_are_kept_once():
    # the same correct text sampled three times for A, and A occurring twice in the round (two records)
    prompts, texts = [A, A, A, B, B, A], ["s", "s", "t", "u", "u", "s"]
    assert select_best(prompts, texts, [1.0] * 6, 1.0, keep=4) == [0, 2, 3]
    assert select_best(prompts, texts, [1.0] * 6, 1.0, keep=1) == [0, 3]


def test_keep_per_prompt_keeps_distinct_ties_at_the_best_only():
    prompts = [A] * 5 + [B] * 3
    texts = ["p", "q", "p", "r", "s", "u", "v", "w"]
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 0.2, 0.9, 0.9]
    # A: best 1 -> p (0), q (1), p again (2) is a duplicate, r (3) is below the best, s (4); B: best 0.9 -> v, w;
    # u (0.2) does not fill B's third slot: only completions tied at the best count
    assert select_best(prompts, texts, rewards, 0.0, keep=3) == [0, 1, 4, 6, 7]
    assert select_best(prompts, texts, rewards, 0.0, keep=2) == [0, 1, 6, 7]
    assert select_best(prompts, texts, rewards, 0.0, keep=100) == [0, 1, 4, 6, 7]


def test_truncated_completions_are_never_kept():
    """main gives a completion cut at max_new_tokens the reward -inf: not kept, whatever r_min."""
    assert select_best([A, A, B], ["x", "y", "z"], [-math.inf, 0.0, -math.inf], -math.inf) == [1]


def test_reward_model_scores_match_one_row_each(sft_run):
    """Left-padded prompts and completions cut after their end-of-turn token, scored in one batch, against each
    (prompt, completion) alone in a row of its own: the head reads the same last token."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

    from common.sampling import generate, rm_scores
    from common.template import encode_prompt
    tok = AutoTokenizer.from_pretrained(sft_run)
    policy = AutoModelForCausalLM.from_pretrained(sft_run, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(sft_run, num_labels=1, attn_implementation="sdpa").eval()
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {q}?"}]) for q in ("1+1", "77-13", "98+87")]
    cfg = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    cpu = torch.device("cpu")
    comp, mask, ended = generate(policy, prompts, 3, tok, cfg, cpu)
    assert ended.any() and len(set(mask.sum(-1).tolist())) > 1  # completions of different lengths
    scores = rm_scores(rm, prompts, comp, mask, 3, tok.pad_token_id, cpu)
    with torch.no_grad():
        alone = [rm(input_ids=torch.tensor([prompts[i // 3] + comp[i, :int(mask[i].sum())].tolist()])).logits[0, 0]
                 for i in range(len(comp))]
    assert torch.allclose(scores, torch.stack(alone), atol=1e-5)


def test_prompt_without_answer_names_file_line_and_field(base, tmp_path):
    path = tmp_path / "rl.jsonl"
    recs = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit, match=f"^error: {path}:2: missing field 'answer'") as e:
        rft.main(rft.parse_args(["--model", base, "--data", str(path), "--output_dir", str(tmp_path / "out")]))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_missing_default_model_is_one_line_error(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/sft here
    with pytest.raises(SystemExit, match="^error: runs/sft not found: run algos/sft.py first, or pass --model$"):
        rft.main(rft.parse_args(["--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def short(tmp_path, sft_run):
    """Two rounds of 64 prompts x 4 samples, small files: seconds."""
    return ["--model", sft_run, "--data", head("rl.jsonl", tmp_path / "rl_128.jsonl", 128),
            "--eval_data", head("eval.jsonl", tmp_path / "eval_32.jsonl", 32), "--rounds", 2,
            "--prompts_per_round", 64, "--gen_batch_size", 32, "--num_samples", 4, "--lr", 1e-3]


def test_short_run_writes_metrics_and_a_model(sft_run, tmp_path):
    out = tmp_path / "out"
    run("rft", *short(tmp_path, sft_run), "--keep_per_prompt", 2, "--output_dir", out)
    m = metrics(out)
    assert [r["step"] for r in m] == [0, 1, 2] and all("eval/accuracy" in r for r in m)
    for r in m[1:]:
        assert 0 < r["kept_frac"] <= 1 and 0 < r["kept"] <= 2 * 64  # up to 2 per prompt
        assert r["steps"] == math.ceil(r["kept"] / 16) and math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 <= r["reward/mean"] <= 1 and r["response_length"] > 0
    from transformers import AutoModelForCausalLM
    before, after = load_file(sft_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert json.loads((out / "args.json").read_text())["keep_per_prompt"] == 2


def test_two_processes_give_the_same_rft_losses(sft_run, tmp_path):
    """One process with 2 generate calls and 2 micro-batches against 2 processes with one each: the same samples
    (seeded per chunk), the same kept set (gathered), the same global batches, so the same losses."""
    args = [*short(tmp_path, sft_run), "--eval_every", 0, "--batch_size", 8]
    run("rft", *args, "--output_dir", tmp_path / "one", "--grad_accum", 2)
    run("rft", *args, "--output_dir", tmp_path / "two", nproc=2)
    one, two = [[r for r in metrics(tmp_path / d) if "loss" in r] for d in ("one", "two")]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["reward/mean"] == b["reward/mean"] and a["kept"] == b["kept"] and a["steps"] == b["steps"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)


def test_resume_reaches_the_same_weights(sft_run, tmp_path):
    args = [*short(tmp_path, sft_run), "--eval_every", 0, "--save_every", 1]
    run("rft", *args, "--output_dir", tmp_path / "full")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint", tmp_path / "resumed" / "checkpoint")  # as a kill after round 1
    log = run("rft", *args, "--output_dir", tmp_path / "resumed", "--resume", "true")
    assert "at round 1" in log.stdout + log.stderr
    w_full, w_res = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "resumed"))
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    losses = {d: [r["loss"] for r in metrics(tmp_path / d) if r["step"] > 1] for d in ("full", "resumed")}
    assert len(losses["full"]) == 1 and losses["full"] == losses["resumed"]


def test_rft_learns_to_drop_the_habit(sft_run, tok, tmp_path):
    """The defaults from the SFT model: the verifier keeps only correct completions, never the SFT habit of restating
    the first number (common/toy.py), so the habit's teacher-forced probability on the held-out subtractions recedes
    and greedy accuracy holds (as asserted for GRPO in test_rl)."""
    run("rft", "--model", sft_run, "--output_dir", tmp_path / "out")
    acc, echo = habit_outcome("rft", sft_run, tmp_path / "out", tok)
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default), one thread,
    # each from that run's SFT model: P(echo) fell to 0.08-0.34 of its start (worst: avx2, seed 0); held-out accuracy
    # changed by -0.004 to +0.168, and a round's sampled reward can fall: too little and too noisy to assert a rise.
    assert echo[1] < 0.7 * echo[0] and acc[-1] > acc[0] - 0.05
