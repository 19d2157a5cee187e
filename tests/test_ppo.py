"""PPO: GAE, the clipped losses, whitening, per-token rewards, KL estimators and controller by hand; the critic's
initialisation; and learning against the reward model on the embedded task."""
import math

import pytest
import torch
from util import echo_probability, metrics, run

from algos.ppo import Args, adaptive_kl, gae, kl_estimate, load_models, policy_loss, token_rewards, value_loss, whiten
from common.logps import logps_entropy
from common.template import IGNORE, encode_response

# Two completions of widths 3 and 2 (the second padded): r, V and mask on the same grid; padding holds junk.
R = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 9.9]])
V = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
M = torch.tensor([[True, True, True], [True, True, False]])


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_lambda_0_is_one_step_td():
    adv, ret = gae(R, V, M, gamma=0.9, lam=0.0)
    # δ_t = r_t + γ V_t+1 - V_t, with V = 0 after the last token
    td = [[0.1 + 0.9 * 0.4 - 0.5, -0.2 + 0.9 * 0.3 - 0.4, 1.0 - 0.3], [0.0 + 0.9 * 0.5 - 1.0, 2.0 - 0.5, 0.0]]
    assert close(adv, td)
    assert close(ret, [[-0.04 + 0.5, -0.33 + 0.4, 0.7 + 0.3], [-0.55 + 1.0, 1.5 + 0.5, 0.0]])


def test_gae_lambda_1_is_monte_carlo_return_minus_value():
    adv, ret = gae(R, V, M, gamma=0.9, lam=1.0)
    # G_t = r_t + γ G_t+1: row 0: G = [0.1 + 0.9·0.7, -0.2 + 0.9·1.0, 1.0]; row 1: [0.9·2.0, 2.0]
    G = [[0.73, 0.7, 1.0], [1.8, 2.0, 0.0]]
    assert close(ret, G)
    assert close(adv, [[0.73 - 0.5, 0.7 - 0.4, 1.0 - 0.3], [1.8 - 1.0, 2.0 - 0.5, 0.0]])


def test_gae_matches_the_backward_recursion():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    lengths = [7, 4, 1, 0]
    m = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = gae(r, v, m, gamma=0.95, lam=0.8)
    for b, n in enumerate(lengths):  # Â_t = δ_t + γλ Â_t+1, Â_n = 0, V_n = 0
        a_next, expected = 0.0, [0.0] * 7
        for t in reversed(range(n)):
            v_next = v[b, t + 1].item() if t + 1 < n else 0.0
            a_next = r[b, t].item() + 0.95 * v_next - v[b, t].item() + 0.95 * 0.8 * a_next
            expected[t] = a_next
        assert close(adv[b], expected, 1e-5)
        assert close(ret[b], [e + v[b, t].item() if t < n else 0.0 for t, e in enumerate(expected)], 1e-5)


def test_clipped_surrogate_both_signs_inside_and_outside():
    ratio = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 3.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 50.0]])
    mask = torch.tensor([[True] * 6 + [False]])  # the last token is padding: it must not count
    logps = ratio.log().requires_grad_()
    loss, clipped = policy_loss(logps, torch.zeros_like(ratio), adv, mask, clip_eps=0.2, n_tokens=6)
    # per token -min(ρA, clip(ρ)A): inside (1.1, +) -1.1; above (1.5, +) -1.2 clipped; below (0.5, +) -0.5;
    # below (0.5, -) +0.8 clipped; above (1.5, -) +1.5; inside (0.9, -) +0.9
    assert abs(loss.item() - (-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6) < 1e-6
    assert clipped.tolist() == [[False, True, False, True, False, False, False]]
    loss.backward()
    # d/dlogπ of -ρA/6 = -ρA/6 where the unclipped term is active, 0 where the clip is
    assert close(logps.grad, [[-1.1 / 6, 0, -0.5 / 6, 0, 1.5 / 6, 0.9 / 6, 0]])


def test_clipped_value_loss():
    v = torch.tensor([[0.5, 0.1, -0.5, 0.5, 0.15, 4.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    loss, clipped = value_loss(v, v_old, ret, mask, vf_clip=0.2, n_tokens=5)
    # (V-R)² vs (V_old + clip(V-V_old, ±0.2) - R)²:
    # 0.25 vs 0.64; 1.21 vs 1.21; 0.25 vs 0.64; 0.25 vs 0.04; 0.7225 either
    assert abs(loss.item() - 0.5 * (0.64 + 1.21 + 0.64 + 0.25 + 0.7225) / 5) < 1e-6
    assert clipped.tolist() == [[True, False, True, False, False, False]]
    loss.backward()
    # no gradient through the clip
    assert close(v.grad, [[0, (0.1 + 1.0) / 5, 0, (0.5 - 1.0) / 5, (0.15 - 1.0) / 5, 0]])


def test_whitening_over_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 4)  # mean 2.5 over the four real tokens
    assert close(whiten(x, m), [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0, 0]], 1e-5)
    # a global reduction (here: a stand-in that doubles every sum, as two identical processes would) changes nothing
    assert close(whiten(x, m, lambda s: 2 * s), whiten(x, m), 1e-6)


def test_per_token_reward_is_kl_penalty_plus_score_at_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.4, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    r = token_rewards(torch.tensor([2.0, -1.0, 5.0]), kl, mask, beta=0.1)
    assert close(r, [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.04 - 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_kl_estimators_by_hand_and_by_monte_carlo():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = log π_ref/π = -log 2
    assert close(kl_estimate(lp, ref, "k1"), [math.log(2)])
    assert close(kl_estimate(lp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(kl_estimate(lp, ref, "k3"), [0.5 - 1 + math.log(2)])
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.7])
    analytic = (p * (p / q).log()).sum().item()  # KL(p‖q) = 0.6 ln 7 ≈ 1.168
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = {k: kl_estimate(p.log()[y], q.log()[y], k) for k in ("k1", "k2", "k3")}
    assert abs(est["k1"].mean().item() - analytic) < 0.01 and abs(est["k3"].mean().item() - analytic) < 0.01
    assert est["k3"].min().item() >= 0 and est["k1"].min().item() < 0
    exact_k2 = (p * 0.5 * (q / p).log() ** 2).sum().item()  # E_p[½ log² r] = 0.4 ln² 7 ≈ 1.515: biased upwards
    assert abs(est["k2"].mean().item() - exact_k2) < 0.02 and exact_k2 - analytic > 0.3


def test_adaptive_kl_controller():
    # e = clip(KL/target - 1, ±0.2); β ← β (1 + e n / horizon)
    assert abs(adaptive_kl(0.1, 2.0, 1.0, 64, 10000) - 0.1 * (1 + 0.2 * 64 / 10000)) < 1e-12
    assert abs(adaptive_kl(0.1, 0.9, 1.0, 64, 10000) - 0.1 * (1 - 0.1 * 64 / 10000)) < 1e-12
    assert abs(adaptive_kl(0.1, 0.0, 1.0, 64, 10000) - 0.1 * (1 - 0.2 * 64 / 10000)) < 1e-12
    assert adaptive_kl(0.1, 1.0, 1.0, 64, 10000) == 0.1


def test_log_probs_and_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, -1e4]])
    lp, ent = logps_entropy(logits, torch.tensor([2, 0]))
    assert close(lp, [math.log(0.25), math.log(0.6)])  # 3/(3+1+1)
    assert close(ent, [math.log(4), -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))], 1e-5)


def test_critic_starts_as_the_reward_model_with_dropout_off(sft_run, rm_run, tok):
    args = Args(model=str(sft_run), ref_model=str(sft_run), reward_model=str(rm_run))  # the rest: the defaults
    _, _, rm, critic = load_models(args, tok, True, 1, torch.device("cpu"))
    assert not rm.training and not critic.training and critic.dropout.p == 0.0
    ids, labels = encode_response(tok, [{"role": "user", "content": "What is 2+3?"}],
                                  [{"role": "assistant", "content": "2+3=5"}])
    ids = torch.tensor([ids[:max(i for i, l in enumerate(labels) if l != IGNORE) + 1]])  # as rm.py reads it
    assert ids[0, -1].item() == tok.eos_token_id
    with torch.no_grad():
        values = critic(input_ids=ids).logits[0, :, 0]
        assert abs(values[-1].item() - rm(input_ids=ids).logits.item()) < 1e-5  # same head, read at every position
        critic.train()  # even in training mode the critic has no dropout to add noise
        assert torch.equal(critic(input_ids=ids).logits[0, :, 0], values)


def test_missing_reward_model_is_one_line_error(sft_run, tmp_path):
    p = run("ppo", "--model", sft_run, "--reward_model", tmp_path / "nope", "--output_dir", tmp_path / "out",
            check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ppo_run(sft_run, rm_run, tmp_path_factory):
    """The defaults, cut to 25 rollouts (the RM score rises from the first steps; see the report for the full
    budget)."""
    out = tmp_path_factory.mktemp("ppo")
    run("ppo", "--model", sft_run, "--reward_model", rm_run, "--output_dir", out, "--max_steps", 25,
        "--log_every", 1, "--eval_every", 25, "--save_every", 0)
    return out


def test_ppo_raises_the_reward_model_score_and_reports_gold(ppo_run):
    ms = metrics(ppo_run)
    ev, train = [m for m in ms if "eval/rm_score" in m], [m for m in ms if "reward/mean" in m]
    first, last = (sum(m["reward/mean"] for m in part) / len(part) for part in (train[:5], train[-5:]))
    print(f"ppo held-out greedy RM score {ev[0]['eval/rm_score']:.3f} -> {ev[-1]['eval/rm_score']:.3f}, gold accuracy "
          f"{ev[0]['eval/accuracy']:.3f} -> {ev[-1]['eval/accuracy']:.3f}; "
          f"sampled RM score (5-step means) {first:.3f} -> {last:.3f}, "
          f"sampled gold {train[0]['reward/gold']:.3f} -> {train[-1]['reward/gold']:.3f}, "
          f"kl_seq {train[-1]['kl_seq']:.3f}")
    assert [m["step"] for m in ev] == [0, 25] and len(train) == 25
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default), each from that
    # run's SFT and RM models, the held-out greedy RM score rose by 1.51 ± 0.49, at least +0.852 (avx2, seed 1);
    # meanwhile gold accuracy fell in 7 of the 9 runs (by up to 0.117): PPO over-optimises the learned reward (see
    # docs/results.md). The sampled score's 5-step means are too noisy at this budget to assert on.
    assert ev[-1]["eval/rm_score"] > ev[0]["eval/rm_score"] + 0.3
    assert all(0 <= m["reward/gold"] <= 1 for m in train) and all(0 <= m["eval/accuracy"] <= 1 for m in ev)
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 and m["ppo_updates"] == 16 for m in train)
    assert train[0]["kl"] < 1e-6 < train[-1]["kl"]  # the first rollout is the reference's own; then the actor moves
    assert all(0 < m["distinct2"] <= 1 for m in train)
    from transformers import AutoModelForTokenClassification
    critic = AutoModelForTokenClassification.from_pretrained(ppo_run / "critic")
    assert critic.config.num_labels == 1  # the critic is saved


def test_ppo_on_the_verifier_needs_no_reward_model_and_lowers_the_habit(sft_run, tok, tmp_path):
    """--reward verifier: the reward GRPO, RLOO and ReMax optimise (exact match of the final number), so PPO's critic
    and GAE compare with them on equal terms. No reward model is read (a missing one is no error); the critic starts
    from the SFT model with a zero head. The defaults, cut to 30 of 100 rollouts (each makes 16 PPO updates)."""
    out = tmp_path / "out"
    run("ppo", "--reward", "verifier", "--model", sft_run, "--reward_model", tmp_path / "nowhere", "--output_dir", out,
        "--max_steps", 30, "--eval_every", 30, "--save_every", 0)
    ms = metrics(out)
    ev, train = [m for m in ms if "eval/accuracy" in m], [m for m in ms if "reward/mean" in m]
    print(f"ppo (verifier) held-out accuracy {ev[0]['eval/accuracy']:.3f} -> {ev[-1]['eval/accuracy']:.3f}, "
          f"sampled reward {train[0]['reward/mean']:.3f} -> {train[-1]['reward/mean']:.3f}")
    assert all(m["reward/mean"] == m["reward/gold"] for m in train)  # the reward is the verifier's 0/1
    assert all(m["value_loss"] > 0 for m in train) and not any("eval/rm_score" in m for m in ev)
    echo = [echo_probability(path, tok) for path in (sft_run, out)]
    print(f"P(echo) on held-out subtraction {echo[0]:.3f} -> {echo[1]:.3f}")
    # The habit's probability must recede (as in test_rl). Held-out accuracy is only guarded against collapse: 30 of
    # PPO's 100 rollouts are too few for it to rise everywhere (the full run's gain is in docs/results.md). Under
    # ATEN_CPU_CAPABILITY=default (seed 0) P(echo) fell to 0.96 / 0.84 / 0.67 of its start in 10 / 20 / 30 rollouts:
    # 10 were too few to see the habit recede everywhere. At 30, over seeds 0-2 x the kernel paths (avx512, avx2,
    # default), one thread, each from that run's SFT model and runs/toy built natively: P(echo) fell to 0.33-0.76 of its
    # start, accuracy changed by -0.015 to +0.137. With runs/toy built under avx2 / default (seed 0): -0.015 / -0.004;
    # on another machine of this kind, runs/toy built there under avx2: P(echo) to 0.81 of its start, accuracy -0.109.
    assert echo[1] < 0.9 * echo[0] and ev[-1]["eval/accuracy"] > ev[0]["eval/accuracy"] - 0.15
