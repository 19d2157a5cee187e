"""The offline preference family (dpo, ipo, kto, orpo, simpo): losses by hand from their equations,
gradient directions, KTO's mismatched pairs, DPOP's term, bad input, 1 vs 2 processes, and learning."""
import json
import math

import pytest
import torch
from util import GRAD_REL, head, metrics, run

from algos import dpo, kto
from algos.dpo import dpo_loss
from algos.ipo import ipo_loss
from algos.kto import kto_loss, mismatched
from algos.orpo import log_odds, orpo_loss
from algos.simpo import simpo_loss
from common import toy

T = torch.tensor


def nls(x):
    """-log σ(x), computed by hand."""
    return math.log1p(math.exp(-x))


def close(a, b, tol=1e-6):
    a = a.item() if torch.is_tensor(a) else a
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---- DPO ----

def test_dpo_by_hand():
    # pair 0: ratios +0.5 and -0.5, h = 1; pair 1: equal log-ratios, h = 0; pair 2: h = -2 (wrong way)
    lc, lr, rc, rr = T([-1.0, -3.0, -6.0]), T([-2.0, -4.0, -1.0]), T([-1.5, -3.0, -5.0]), T([-1.5, -4.0, -2.0])
    by_hand = [nls(0.1 * 1.0), math.log(2), nls(0.1 * -2.0)]
    loss, rew_c, rew_r = dpo_loss(lc, lr, rc, rr, 0.1, 3)
    assert close(loss, sum(by_hand) / 3)
    assert torch.allclose(rew_c, T([0.05, 0.0, -0.1])) and torch.allclose(rew_r, T([-0.05, 0.0, 0.1]))  # β·log-ratio
    assert close(dpo_loss(lc, lr, rc, rr, 0.1, 6)[0], sum(by_hand) / 6)  # divided by the global pair count given
    # conservative DPO: -(1-ε)·log σ(βh) - ε·log σ(-βh)
    eps = 0.2
    smoothed = dpo_loss(lc[:1], lr[:1], rc[:1], rr[:1], 0.1, 1, label_smoothing=eps)[0]
    assert close(smoothed, (1 - eps) * nls(0.1) + eps * nls(-0.1))


def test_dpo_edges():
    z = T([0.0])
    assert close(dpo_loss(T([-3.0]), T([-7.0]), T([-3.0]), T([-7.0]), 0.5, 1)[0], math.log(2))  # policy = reference
    assert dpo_loss(T([0.0]), T([-400.0]), z, z, 1.0, 1)[0].item() < 1e-30  # large margin the right way: ~0
    assert close(dpo_loss(T([-400.0]), T([0.0]), z, z, 1.0, 1)[0], 400.0)  # the wrong way: linear, finite


def test_dpop_term_only_below_the_reference():
    lc, lr, ref_c, ref_r = T([-1.0]), T([-3.0]), T([-1.5]), T([-2.0])  # chosen above its reference: no penalty
    assert close(dpo_loss(lc, lr, ref_c, ref_r, 0.1, 1, dpop_lambda=50.0)[0], dpo_loss(lc, lr, ref_c, ref_r, 0.1, 1)[0])
    lc = T([-1.9])  # 0.4 below its reference: h = (-0.4 - (-1)) - 50·0.4 = -19.4
    assert close(dpo_loss(lc, lr, ref_c, ref_r, 0.1, 1, dpop_lambda=50.0)[0], nls(0.1 * -19.4))
    assert dpo_loss(lc, lr, ref_c, ref_r, 0.1, 1, dpop_lambda=50.0)[0] > dpo_loss(lc, lr, ref_c, ref_r, 0.1, 1)[0]
    # the penalty's gradient raises the chosen log-prob more strongly than plain DPO does
    grads = []
    for lam in (0.0, 50.0):
        x = lc.clone().requires_grad_()
        dpo_loss(x, lr, ref_c, ref_r, 0.1, 1, dpop_lambda=lam)[0].backward()
        grads.append(x.grad.item())
    assert grads[1] < grads[0] < 0


def test_rpo_adds_the_chosen_mean_token_nll():
    """RPO: L_DPO + α·Σ_i -log πθ(yw_i|x_i) / N_w, N_w the chosen tokens of the global batch (20 here, the rest of
    the batch on another process); its gradient on each chosen log-prob is -α/N_w more than DPO's."""
    lc, lr, rc, rr = T([-4.0, -9.0]), T([-5.0, -6.0]), T([-4.5, -8.0]), T([-5.0, -7.0])
    plain = dpo_loss(lc, lr, rc, rr, 0.1, 4)[0]
    rpo = dpo_loss(lc, lr, rc, rr, 0.1, 4, rpo_alpha=0.5, n_chosen_tokens=20)[0]
    assert close(rpo, plain.item() + 0.5 * (4.0 + 9.0) / 20)
    grads = []
    for alpha in (0.0, 0.5):
        x = lc.clone().requires_grad_()
        dpo_loss(x, lr, rc, rr, 0.1, 4, rpo_alpha=alpha, n_chosen_tokens=20)[0].backward()
        grads.append(x.grad)
    assert torch.allclose(grads[1] - grads[0], T([-0.5 / 20] * 2))


# ---- IPO, SimPO, ORPO, KTO ----

def test_ipo_by_hand():
    lc, lr, rc, rr = T([-1.0, -2.0]), T([-2.0, -2.0]), T([-1.5, -2.0]), T([-1.5, -2.0])  # h = 1, then 0
    tau = 0.25  # target margin 1/(2τ) = 2
    assert close(ipo_loss(lc, lr, rc, rr, tau, 2)[0], ((1 - 2) ** 2 + (0 - 2) ** 2) / 2)
    # at the target the loss and its gradient vanish; past it the gradient pulls the margin back (unlike DPO)
    grads = []
    for h in (2.0, 3.0):
        x = T([h]).requires_grad_()
        loss = ipo_loss(x, T([0.0]), T([0.0]), T([0.0]), tau, 1)[0]
        loss.backward()
        assert close(loss, (h - 2) ** 2)
        grads.append(x.grad.item())
    assert grads[0] == 0 and close(grads[1], 2 * (3.0 - 2))  # d/dh (h - 2)² = 2(h - 2): positive, the margin shrinks


def test_simpo_by_hand():
    # β=2, γ=1: rewards 2·(-2)/4 = -1 and 2·(-6)/3 = -4, h = 3 - 1 = 2
    loss, rew_c, rew_r = simpo_loss(T([-2.0]), T([-6.0]), T([4]), T([3]), 2.0, 1.0, 1)
    assert close(loss, nls(2.0)) and close(rew_c, -1.0) and close(rew_r, -4.0)
    assert close(simpo_loss(T([-2.0]), T([-2.0]), T([4]), T([4]), 2.0, 1.0, 1)[0], nls(-1.0))  # equal: margin -γ
    assert close(simpo_loss(T([-2.0]), T([-2.0]), T([4]), T([4]), 2.0, 0.0, 1)[0], math.log(2))
    assert close(simpo_loss(T([-800.0]), T([0.0]), T([4]), T([4]), 2.0, 0.0, 1)[0], 400.0)  # wrong way: finite


def test_orpo_by_hand():
    lo = lambda a: a - math.log(1 - math.exp(a))  # log(P / (1 - P)), P = e^a
    # avg log-probs -0.5 (chosen, -2 over 4 tokens) and -1.0 (rejected, -3 over 3)
    loss, rew_c, rew_r = orpo_loss(T([-2.0]), T([-3.0]), T([4]), T([3]), 0.1, 1)
    assert close(loss, 0.5 + 0.1 * nls(lo(-0.5) - lo(-1.0)))  # NLL(yw) - λ·log σ(log odds ratio)
    assert close(rew_c, -0.05) and close(rew_r, -0.1)
    assert close(orpo_loss(T([-2.0]), T([-2.0]), T([4]), T([4]), 0.1, 2)[0], (0.5 + 0.1 * math.log(2)) / 2)  # equal
    assert math.isfinite(orpo_loss(T([0.0]), T([-3.0]), T([4]), T([3]), 0.1, 1)[0].item())  # P = 1: finite odds
    assert close(log_odds(T([math.log(0.2)])), math.log(0.25))


def test_kto_by_hand():
    logps, ref, good = T([-1.0, -2.0, -3.0]), T([-1.5, -1.0, -3.0]), T([True, False, True])  # r = 0.5, -1, 0
    beta, z, ld, lu = 0.5, 0.2, 1.0, 1.5
    sig = lambda x: 1 / (1 + math.exp(-x))
    by_hand = [ld - ld * sig(beta * (0.5 - z)), lu - lu * sig(beta * (z - -1.0)), ld - ld * sig(beta * (0.0 - z))]
    loss, rewards = kto_loss(logps, ref, good, z, beta, 3, ld, lu)
    assert close(loss, sum(by_hand) / 3) and torch.allclose(rewards, T([0.25, -0.5, 0.0]))
    # z_ref is clamped at 0: a negative KL estimate acts as 0
    clamped = kto_loss(logps, ref, good, -0.7, beta, 3, ld, lu)[0]
    assert close(clamped, kto_loss(logps, ref, good, 0.0, beta, 3, ld, lu)[0])
    # z_ref carries no gradient, even when handed one that requires it
    zt = T(0.2, requires_grad=True)
    x = logps.clone().requires_grad_()
    kto_loss(x, ref, good, zt, beta, 3, ld, lu)[0].backward()
    assert zt.grad is None and x.grad is not None


def test_kto_mismatched_pairs_for_every_batch_size():
    for n in range(2, 10):  # odd sizes included: no record keeps its own completion
        prompts = [f"p{k}" for k in range(n)]
        assert all(j != k for k, j in enumerate(mismatched(prompts)))
    prompts = ["a", "a", "b", "c", "c"]  # a paired file split in two: both halves share a prompt
    assert all(prompts[j] != prompts[k] for k, j in enumerate(mismatched(prompts)))


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_gradient_raises_chosen_over_rejected(method):
    lc, lr = T([-5.0], requires_grad=True), T([-6.0], requires_grad=True)
    ref, n = T([-5.5]), T([5])
    loss = {"dpo": lambda: dpo_loss(lc, lr, ref, ref, 0.1, 1)[0],
            "ipo": lambda: ipo_loss(lc, lr, ref, ref, 0.1, 1)[0],  # margin 1 below the target 5
            "kto": lambda: kto_loss(torch.cat([lc, lr]), ref.repeat(2), T([True, False]), 0.1, 0.1, 2)[0],
            "orpo": lambda: orpo_loss(lc, lr, n, n, 0.1, 1)[0],
            "simpo": lambda: simpo_loss(lc, lr, n, n, 2.0, 1.0, 1)[0]}[method]()
    loss.backward()
    assert lc.grad.item() < 0 < lr.grad.item()  # descent raises log π(yw|x) and lowers log π(yl|x)


# ---- bad input ----

Q = "What is 1+1?"
BAD = [
    ("dpo", {"prompt": Q, "chosen": "1+1=2"}, ":1: missing field 'rejected'"),
    ("dpo", {"prompt": Q, "chosen": "1+1=2", "rejected": "1+1=2"}, ":1: fields 'chosen' and 'rejected' are identical"),
    ("dpo", {"prompt": Q, "chosen": " ", "rejected": "1+1=3"}, ":1: field 'chosen' is an empty completion"),
    ("kto", {"prompt": Q, "completion": "1+1=2", "label": "yes"}, ":1: field 'label' must be bool, got str"),
    ("kto", {"prompt": Q, "completion": "1+1=2", "label": 1}, ":1: field 'label' must be bool, got int"),
    ("kto", {"prompt": Q, "completion": "1+1=2"}, ":1: missing field 'label'"),
    ("kto", {"prompt": Q, "completion": "", "label": True}, ":1: field 'completion' is an empty completion"),
    ("kto", {"prompt": Q, "chosen": "1+1=2", "rejected": "1+1=2"}, ":1: fields 'chosen' and 'rejected' are identical"),
]


@pytest.mark.parametrize("script,rec,expected", BAD, ids=[f"{s}:{e.split(': ', 1)[1]}" for s, _, e in BAD])
def test_bad_records(script, rec, expected, base, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "What is 2+2?", "chosen": "2+2=4", "rejected": "2+2=5"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
    mod = {"dpo": dpo, "kto": kto}[script]
    with pytest.raises(SystemExit) as e:
        mod.main(mod.parse_args(["--model", str(base), "--data", str(path), "--output_dir", str(tmp_path / "out")]))
    assert str(e.value).startswith(f"error: {path}") and expected.replace(":1:", ":2:") in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_missing_sft_model_is_a_clear_error(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a directory without runs/sft, the default --model
    with pytest.raises(SystemExit, match="^error: runs/sft not found: run algos/sft.py first, or pass --model$"):
        dpo.main(dpo.parse_args(["--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


# ---- runs ----

def test_dropout_is_off_in_policy_and_reference(base, tmp_path):
    """A config asking for attention dropout: at step 1 (no update yet) the policy's log-probs must equal
    the reference's exactly, which they would not if either forward dropped anything."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(base, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))
    out = tmp_path / "out"
    dpo.main(dpo.parse_args(["--model", model, "--data", head("prefs.jsonl", tmp_path / "p.jsonl", 64),
                             "--eval_pairs", head("prefs_eval.jsonl", tmp_path / "e.jsonl", 8),
                             "--eval_data", head("eval.jsonl", tmp_path / "g.jsonl", 8), "--output_dir", out,
                             "--max_steps", 1, "--batch_size", 8, "--save_every", 0]))
    m = metrics(out)[1]
    assert abs(m["logps/chosen"] - m["logps/ref_chosen"]) < 1e-5
    assert abs(m["logps/rejected"] - m["logps/ref_rejected"]) < 1e-5
    assert m["rewards/margin"] == 0.0


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_user_data_alone_reads_no_embedded_eval_set(method, base, tmp_path, monkeypatch):
    """With --data and no eval set given, no embedded file is read: evaluation is empty, training logs as usual."""
    import importlib

    from common import toy
    mod = importlib.import_module(f"algos.{method}")
    path = head("kto.jsonl" if method == "kto" else "prefs.jsonl", tmp_path / "d.jsonl", 32)
    monkeypatch.setattr(toy, "data", lambda name: pytest.fail(f"read the embedded {name}"))
    out = tmp_path / "out"
    mod.main(mod.parse_args(["--model", base, "--data", path, "--output_dir", out, "--max_steps", 2,
                             "--batch_size", 8, "--log_every", 1, "--save_every", 0]))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and not any(k.startswith("eval/") for r in rows for k in r)
    assert all(math.isfinite(r["loss"]) and "logps/chosen" in r and "rewards/margin" in r for r in rows[1:])


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_two_processes_match_one(method, base, tmp_path):
    """FSDP2 over 2 gloo processes, 2 pairs (kto: 4 records) each, against 1 process with the same batch a step:
    every normalisation (pairs, ORPO's token count, KTO's reference point) is over the global batch."""
    data, batch = ("kto.jsonl", 4) if method == "kto" else ("prefs.jsonl", 2)
    small = ["--model", base, "--data", head(data, tmp_path / "p.jsonl", 64),
             "--eval_pairs", head("prefs_eval.jsonl", tmp_path / "e.jsonl", 8),
             "--eval_data", head("eval.jsonl", tmp_path / "g.jsonl", 8),
             "--max_steps", 3, "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--lr", 1e-3]
    run(method, "--output_dir", tmp_path / "one", "--batch_size", 2 * batch, *small)
    run(method, "--output_dir", tmp_path / "two", "--batch_size", batch, *small, nproc=2)
    one, two = ([m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two"))
    assert len(one) == len(two) == 3 and one[-1]["loss"] != one[0]["loss"]
    for a, b in zip(one, two):
        # float summation order: one packed row of 4 pairs against two of 2 (1.2e-5 seen by step 3 at lr 1e-3);
        # a wrong normalisation by the pair count would be off by a factor of 2
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["rewards/margin"] - b["rewards/margin"]) < 1e-4
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)
    pref_one, pref_two = (metrics(tmp_path / d)[-1]["eval/pref_accuracy"] for d in ("one", "two"))
    assert abs(pref_one - pref_two) < 1e-6


# Shorter than the defaults (25 of 50 steps, on the first 1600 pairs), where the learning already shows.
LEARN = {"dpo": "prefs.jsonl", "ipo": "prefs.jsonl", "kto": "kto.jsonl", "orpo": "prefs.jsonl", "simpo": "prefs.jsonl"}


@pytest.mark.parametrize("method", LEARN)
def test_learns_preferences_and_keeps_accuracy(method, sft_run, tmp_path):
    out = tmp_path / method
    held_out = ["--eval_data", toy.data("eval.jsonl"), "--eval_pairs", toy.data("prefs_eval.jsonl")]  # own --data
    run(method, "--model", sft_run, "--data", head(LEARN[method], tmp_path / "data.jsonl", 1600), "--output_dir", out,
        "--max_steps", 25, "--eval_every", 0, "--save_every", 0, *held_out)
    ev = [m for m in metrics(out) if "eval/accuracy" in m]
    (acc0, acc1), (pref0, pref1) = ((ev[0][k], ev[-1][k]) for k in ("eval/accuracy", "eval/pref_accuracy"))
    print(f"{method}: eval/accuracy {acc0:.3f} -> {acc1:.3f}, eval/pref_accuracy {pref0:.3f} -> {pref1:.3f}, "
          f"eval/margin {ev[0]['eval/margin']:.3f} -> {ev[-1]['eval/margin']:.3f}")
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default),
    # each from that run's SFT model: accuracy changed by -0.023 (dpo, ipo) to +0.160 (orpo).
    assert acc1 >= acc0 - 0.04  # the SFT model's generation accuracy is kept, within a few points
    if method in ("orpo", "simpo"):  # reference-free: the start is the SFT model's own likelihood ranking (0.79-0.85),
        # near what a model of this arithmetic skill can rank; the ranking or the held-out margin must still improve.
        # Over the same 9 runs: orpo's ranking rose by +0.015 to +0.070 (its margin moved -0.004 to +0.006); simpo's
        # ranking moved -0.016 to +0.023 and its margin rose on every run (+0.019 to +0.075).
        assert pref1 >= pref0 - 0.04 and (pref1 > pref0 or ev[-1]["eval/margin"] > ev[0]["eval/margin"])
    else:  # implicit rewards start at 0 (a coin, 0.5) and must rank most held-out pairs right
        # dpo / ipo / kto over the same 9 runs: 0.727 / 0.728 / 0.720 on average, the worst 0.641 / 0.633 / 0.629
        # (avx2, seed 2): the threshold sits below it by about 1.6 standard errors of a ranking over these 256 pairs
        assert pref1 >= 0.58
