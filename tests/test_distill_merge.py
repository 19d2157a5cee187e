"""distill.py and merge.py: KL losses and merge methods against hand-computed values, refusals, learning."""
import math
import os
import shutil

import pytest
import torch
from util import GRAD_REL, head, metrics, run

from common import toy
from common.template import IGNORE

from algos.distill import (forward_kl_loss, gkd_loss, jsd_per_token, kl_per_token, nll_loss, prompt_of,
                           reverse_kl_loss)
from algos.merge import Args as MergeArgs
from algos.merge import dare, linear, merge_state_dicts, merge_weights, slerp, task_arithmetic, ties, trim

DISTILL_STEPS = 30
P, Q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])


# ---- KL losses: KL(p‖q) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); KL(q‖p) = 0.75 ln 1.5 - 0.25 ln 2

def test_forward_and_reverse_kl_by_hand():
    teacher, student = P.log(), Q.log()  # log-probabilities are valid logits
    assert forward_kl_loss(student, teacher, 1).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    kl_qp = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    assert reverse_kl_loss(student, teacher, 1).item() == pytest.approx(kl_qp, abs=1e-6)
    # a sum over positions divided by the global token count (here 2 positions of 5 in the global batch)
    two = forward_kl_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), 5)
    assert two.item() == pytest.approx(0.5 * math.log(4 / 3) / 5, abs=1e-6)


def test_kl_is_zero_when_student_equals_teacher():
    logits = torch.randn(7, 11)
    for loss in (forward_kl_loss, reverse_kl_loss):
        for t in (1.0, 2.0):
            assert loss(logits.clone(), logits, 7, t).abs().item() < 1e-6
    assert kl_per_token(logits, logits + 3.0).abs().max().item() < 1e-5  # shift-invariant: same distribution


def test_temperature_softens_both_and_scales_by_tau_squared():
    # teacher logits [0, 2 ln 3] at τ = 2 give p = [1/4, 3/4]; student logits [0, 0] give q = [1/2, 1/2]
    teacher, student = torch.tensor([[0.0, 2 * math.log(3)]]), torch.zeros(1, 2, requires_grad=True)
    kl_pq = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    loss = forward_kl_loss(student, teacher, 1, temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl_pq, abs=1e-6)
    loss.backward()  # d/dz τ² KL(p_τ ‖ softmax(z/τ)) = τ (q_τ - p_τ)
    assert torch.allclose(student.grad, 2 * torch.tensor([[0.5 - 0.25, 0.5 - 0.75]]), atol=1e-6)
    kl_qp = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert reverse_kl_loss(torch.zeros(1, 2), teacher, 1, 2.0).item() == pytest.approx(4 * kl_qp, abs=1e-6)


def test_reverse_kl_gradient_flows_to_the_student_only():
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    reverse_kl_loss(s, t, 3).backward()
    forward_kl_loss(s, t, 3).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_generalised_jsd_by_hand():
    """JSD_β = β·KL(T ‖ M) + (1-β)·KL(S ‖ M), M = β·T + (1-β)·S; β = 0 and 1 are the forward and reverse KL, the
    limits of JSD_β/β and JSD_β/(1-β); the teacher gets no gradient."""
    teacher, student = P.log(), Q.log()
    for beta in (0.5, 0.3):
        m = beta * P + (1 - beta) * Q
        want = beta * (P * (P / m).log()).sum() + (1 - beta) * (Q * (Q / m).log()).sum()
        assert gkd_loss(student, teacher, 1, beta).item() == pytest.approx(want.item(), abs=1e-6)
    assert gkd_loss(student, teacher, 2, 0.0).item() == pytest.approx(0.5 * math.log(4 / 3) / 2, abs=1e-6)
    kl_qp = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    assert gkd_loss(student, teacher, 1, 1.0).item() == pytest.approx(kl_qp, abs=1e-6)
    small, kl_pq = 1e-4, 0.5 * math.log(4 / 3)
    assert (jsd_per_token(student, teacher, small) / small).item() == pytest.approx(kl_pq, rel=1e-2)
    assert (jsd_per_token(student, teacher, 1 - small) / small).item() == pytest.approx(kl_qp, rel=1e-2)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    gkd_loss(s, t, 1, 0.5).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_gkd_prompt_is_the_conversation_before_its_last_response():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [IGNORE, IGNORE, 3, 4, IGNORE, IGNORE, 7, 8]  # two assistant turns: 3 4 and 7 8
    assert prompt_of(ids, labels) == [1, 2, 3, 4, 5, 6]


def test_seqkd_nll_by_hand():
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])  # p(1) = 3/4 in row 0, p(1) = 1/4 in row 1
    by_hand = -(math.log(0.75) + math.log(0.25)) / 4
    assert nll_loss(logits, torch.tensor([1, 1]), 4).item() == pytest.approx(by_hand, abs=1e-6)


def test_a_bad_mode_or_method_is_a_one_line_usage_error(capsys):
    from algos import distill, merge
    for module, args, choices in ((distill, ["--mode", "kd"], "seqkd, forward_kl, reverse_kl, on_policy, gkd"),
                                  (merge, ["--method", "mean"], "linear, slerp, task_arithmetic, ties, dare")):
        with pytest.raises(SystemExit) as e:
            module.parse_args(args)
        expected = f"error: {args[0]} must be one of {choices}, got '{args[1]}' (see --help)"
        assert e.value.code == 2 and capsys.readouterr().err.strip() == expected


# ---- merge methods on small tensors

def test_linear_and_wise_ft():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(linear([a, b], [0.5, 0.5]), torch.tensor([2.0, 4.0]))
    args = MergeArgs(alpha=0.25)  # θ = 0.75 θ_base + 0.25 θ_ft
    out = merge_state_dicts("linear", [{"w": b}], {"w": a}, [1.0], args)["w"]
    assert torch.allclose(out, torch.tensor([1.5, 3.0]))


def test_slerp_keeps_unit_norm_and_is_linear_for_parallel_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(e1, e2, 0.5), torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)
    for t in (0.0, 0.1, 0.3, 0.7, 1.0):  # on the unit circle: (cos tπ/2, sin tπ/2)
        v = slerp(e1, e2, t)
        assert v.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(v, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]), atol=1e-6)
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.allclose(slerp(a, 2 * a, 0.3), 0.7 * a + 0.3 * 2 * a)  # parallel: the linear fallback


def test_task_arithmetic_by_hand():
    base, m1, m2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    assert torch.allclose(task_arithmetic(base, [m1, m2], [1.0, 1.0], scale=0.5), torch.tensor([1.5, 2.0]))


def test_ties_trims_elects_the_sign_and_averages_agreeing_entries():
    assert torch.equal(trim(torch.tensor([3.0, -1.0, 0.5, -2.0]), 0.5), torch.tensor([3.0, 0.0, 0.0, -2.0]))
    base = torch.tensor([10.0, 0.0, 1.0])
    taus = [torch.tensor([4.0, 1.0, -3.0]), torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-2.0, 0.1, 0.3])]
    # density 2/3 keeps 2 of 3: [4, 0, -3], [0, -5, -2], [-2, 0, 0.3]; sums [2, -5, -4.7] elect [+, -, -];
    # entry 0: only 4 agrees (-2 is outvoted); entry 1: -5; entry 2: mean(-3, -2) (0.3 disagrees)
    out = ties(base, [base + t for t in taus], [1.0] * 3, density=2 / 3)
    assert torch.allclose(out, base + torch.tensor([4.0, -5.0, -2.5]))


def test_dare_rescale_preserves_the_expectation_and_is_seeded():
    base, tau = torch.zeros(200_000), torch.full((200_000,), 2.0)
    out = dare(base, [tau], [1.0], drop=0.3, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.allclose(out[kept], torch.tensor(2.0 / 0.7))  # survivors rescaled by 1/(1-p)
    assert out.mean().item() == pytest.approx(2.0, abs=0.02)  # E[τ̂] = τ
    again = dare(base, [tau], [1.0], drop=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_linear_weights_are_normalised_and_task_vector_weights_kept():
    """--weights 1 3 without --base: 0.25 A + 0.75 B, the weighted average, not A + 3 B."""
    assert merge_weights("linear", [1.0, 3.0], 2) == [0.25, 0.75]
    assert merge_weights("linear", [], 4) == [0.25] * 4 and merge_weights("ties", [], 2) == [1.0, 1.0]
    assert merge_weights("task_arithmetic", [1.0, 3.0], 2) == [1.0, 3.0]  # they scale task vectors on purpose
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([5.0, -2.0])}
    out = merge_state_dicts("linear", [a, b], None, merge_weights("linear", [1.0, 3.0], 2), MergeArgs())
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 - 0.75 * 2]))


def test_ties_trim_keeps_exactly_the_written_fraction():
    """⌈density·n⌉ of the density as written: 0.55 x 6400 = 3520 and 0.07 x 100 = 7 exactly (their float products
    land just above, 3520.0000000000005 and 7.000000000000001); a true fraction still rounds up (0.5 x 5 -> 3)."""
    g = torch.Generator().manual_seed(0)
    for density, n, kept in ((0.55, 6400, 3520), (0.07, 100, 7), (0.5, 5, 3), (1.0, 8, 8)):
        tau = torch.rand(n, generator=g) + 0.1  # no zeros: every kept entry counts
        assert int((trim(tau, density) != 0).sum()) == kept, (density, n)


def test_merging_a_model_with_itself_returns_it():
    torch.manual_seed(0)
    sd = {"a": torch.randn(4, 3), "b": torch.randn(5), "steps": torch.tensor([3])}
    for method in ("linear", "slerp", "task_arithmetic", "ties", "dare"):
        out = merge_state_dicts(method, [sd], sd, [1.0], MergeArgs(alpha=0.3))
        assert all(torch.allclose(out[k].float(), sd[k].float(), atol=1e-6) for k in sd), method
    out = merge_state_dicts("linear", [sd, sd], None, [0.5, 0.5], MergeArgs())
    assert all(torch.allclose(out[k].float(), sd[k].float(), atol=1e-6) for k in sd)


# ---- merge.py end to end: output, sweep, refusals

def noisy_copy(src, out, noise, seed):
    """A copy of the model at src with noise(p) added to every parameter p, seeded, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(noise(p))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nudged(base, tmp_path_factory):
    """The base with every weight moved by a fixed seeded amount: a second model of the same architecture."""
    return noisy_copy(base, tmp_path_factory.mktemp("nudged"), lambda p: 0.01 * torch.randn_like(p), seed=1)


def test_merge_writes_a_model_and_the_wise_ft_sweep(base, nudged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, few = tmp_path / "m", tmp_path / "eval.jsonl"
    few.write_text("".join(open(toy.data("eval.jsonl")).readlines()[:32]))  # a short eval keeps the sweep fast
    run("merge", "--sweep", "--base", base, "--models", nudged, "--alphas", 0, 0.5, 1, "--alpha", 0.25,
        "--eval_data", few, "--output_dir", out)
    sd_a, sd_b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (base, nudged))
    sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(sd[k], 0.75 * sd_a[k] + 0.25 * sd_b[k], atol=1e-6) for k in sd)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    sweep = [m for m in metrics(out) if "alpha" in m]
    assert [m["alpha"] for m in sweep] == [0, 0.5, 1] and all(m["eval/perplexity"] > 1 for m in sweep)
    assert sweep[0]["eval/perplexity"] == metrics(out)[0]["eval/perplexity"]  # α = 0 is the base itself
    assert os.path.getsize(out / "wiseft.png") > 0


def test_merge_saves_in_the_inputs_dtype(base, nudged, tmp_path):
    """bf16 inputs give a bf16 model (the arithmetic in float32), not one twice their size; --dtype chooses."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    few = tmp_path / "eval.jsonl"
    few.write_text("".join(open(toy.data("eval.jsonl")).readlines()[:8]))
    paths = []
    for name, src in (("a", base), ("b", nudged)):
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    for flag, want in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"m{len(flag)}"
        run("merge", "--base", "", "--models", *paths, "--eval_data", few, "--output_dir", out, *flag)
        with safe_open(out / "model.safetensors", "pt") as f:
            assert all(f.get_tensor(k).dtype == want for k in f.keys())
        assert AutoModelForCausalLM.from_pretrained(out).config.dtype == want


def test_merge_refuses_mismatched_models(base, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(base)
    small = tmp_path / "small"  # the same tensor names, other shapes
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, tie_word_embeddings=True)).save_pretrained(small)
    tok.save_pretrained(small)
    other_tok = tmp_path / "other_tok"  # the same weights, another chat template
    shutil.copytree(base, other_tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(other_tok)
    for bad, what in ((small, "shape"), (other_tok, "tokenizer")):
        p = run("merge", "--base", base, "--models", bad, "--output_dir", tmp_path / "out", check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and what in last and last.startswith("error:")
        assert not (tmp_path / "out").exists()


# ---- distill.py: refusals and learning
# Teacher: the session's SFT model. Student: the same model with seeded Gaussian noise of 0.9 std added to every
# tensor, which leaves it near 4% accuracy (teacher ~21%) but close enough in weight space that a short run of any
# mode must recover a clear part of the gap from the teacher's signal alone (on_policy and seqkd never see an answer).
# A student far from the teacher (the raw base) learns only the chat format in a short run, and the reverse-KL modes
# not even that (their gradient vanishes where the student puts no mass on the teacher's tokens).

@pytest.fixture(scope="module")
def student(sft_run, tmp_path_factory):
    return noisy_copy(sft_run, tmp_path_factory.mktemp("student"),
                      lambda p: 0.9 * p.std() * torch.randn_like(p), seed=0)


def test_distill_refuses_a_missing_teacher_or_another_tokenizer(base, tok, tmp_path):
    out = tmp_path / "out"
    p = run("distill", "--teacher", tmp_path / "nowhere", "--model", base, "--output_dir", out, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: cannot load tokenizer")
    other = tmp_path / "other_tok"
    shutil.copytree(base, other)
    t = type(tok).from_pretrained(base)
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t.save_pretrained(other)
    p = run("distill", "--teacher", other, "--model", base, "--output_dir", out, check=False)
    assert p.returncode != 0 and "tokenizers" in p.stderr.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("mode,source", [("on_policy", "rl.jsonl"), ("gkd", "sft.jsonl")])
def test_on_policy_two_processes_match_one(mode, source, base, tmp_path):
    """The student's samples are seeded per micro-batch: 2 gloo processes of 2 prompts each sample, and lose, what
    1 process with 2 micro-batches of 2 does (gkd: the same steps on-policy, by λ = 0.5)."""
    prompts = head(source, tmp_path / "r.jsonl", 32)
    common = ["--mode", mode, "--model", base, "--teacher", base, "--data", prompts, "--max_steps", 3,
              "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--batch_size", 2, "--lr", 1e-3]
    run("distill", "--output_dir", tmp_path / "one", "--grad_accum", 2, *common)
    run("distill", "--output_dir", tmp_path / "two", *common, nproc=2)
    one, two = ([m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two"))
    assert len(one) == len(two) == 3 and one[-1]["loss"] > 1e-3  # the student leaves the teacher after step 1
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)


@pytest.mark.parametrize("mode", ["seqkd", "forward_kl", "reverse_kl", "on_policy"])
def test_distill_mode_raises_the_students_accuracy(mode, student, sft_run, tmp_path):
    out = tmp_path / mode
    run("distill", "--mode", mode, "--teacher", sft_run, "--model", student, "--max_steps", DISTILL_STEPS, "--lr", 1e-3,
        "--eval_every", 0, "--save_every", 0, "--output_dir", out)
    rows = metrics(out)
    acc = [m["eval/accuracy"] for m in rows if "eval/accuracy" in m]
    kl = [m["kl"] for m in rows if "kl" in m]
    print(f"distill {mode}: student {acc[0]:.3f} -> {acc[-1]:.3f} (teacher {rows[0]['teacher/eval_accuracy']:.3f}); "
          f"kl {kl[0]:.3f} -> {kl[-1]:.3f}")
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default), one thread,
    # teacher and student from that run's SFT model: the student's accuracy rose by +0.020 (on_policy) to +0.293, and
    # the KL to the teacher fell to 0.20-0.65 of its start, 0.88 once (forward_kl, avx2, seed 0): asserted below that
    # worst case, and that the student loses no accuracy. on_policy again after its sampling came to be seeded per
    # micro-batch (the same nine runs, runs/toy built natively): +0.090 ± 0.031 (+0.050 to +0.148), KL 0.29-0.66.
    assert acc[-1] >= acc[0] and kl[-1] < 0.95 * kl[0]
