"""Each algorithm learns on the embedded task with its defaults."""
import json

from util import metrics

from common import toy


def test_base_model_does_not_know_the_chat_format(model, tok):
    recs = [json.loads(line) for line in open(toy.data("eval.jsonl"))]
    assert toy.evaluate(model, tok, recs) < 0.05


def test_sft_learns_and_leaves_headroom(sft_run, tok):
    from transformers import AutoModelForCausalLM
    acc = [m["eval/accuracy"] for m in metrics(sft_run) if "eval/accuracy" in m]
    recs = [json.loads(line) for line in open(toy.data("eval.jsonl"))]
    model = AutoModelForCausalLM.from_pretrained(sft_run, attn_implementation="sdpa")
    add, sub = (toy.evaluate(model, tok, [r for r in recs if op in r["prompt"]]) for op in "+-")
    print(f"sft eval accuracy: {acc[0]:.3f} -> {acc[-1]:.3f} (addition {add:.3f}, subtraction {sub:.3f})")
    # Seeds 0 / 1 / 2 with this machine's kernels: 0.398 / 0.496 / 0.219 (addition 0.659 / 0.829 / 0.318,
    # subtraction 0.134 / 0.157 / 0.118). The habit is learned as a rule (subtraction stays low on every seed); the
    # arithmetic skill on additions is what moves with the seed. The thresholds sit below the worst seen.
    assert acc[0] < 0.05 and 0.12 <= acc[-1] <= 0.7  # learned the format and some additions; headroom remains
    assert add > sub + 0.1  # the habit: subtraction is where the later stages can gain


def test_rm_ranks_held_out_pairs(rm_run):
    acc = [m["eval/accuracy"] for m in metrics(rm_run) if "eval/accuracy" in m]
    print(f"rm held-out pairwise accuracy: {acc[0]:.3f} -> {acc[-1]:.3f}")
    # Chance is 0.5. Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default),
    # each from that run's SFT model: 0.817 ± 0.033, min 0.773 (avx2, seed 1), max 0.879. Without weight decay (lr
    # 3e-4) it was 0.766 ± 0.051, min 0.695; the recipe before that (lr 1e-3, 1000 steps) ranked 0.465 with avx2 and
    # seed 1: its scores tied exactly on half the pairs (the last token's representation collapsed). The threshold
    # sits below the worst seen.
    assert acc[-1] > acc[0] and acc[-1] >= 0.72
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(rm_run).config.num_labels == 1
