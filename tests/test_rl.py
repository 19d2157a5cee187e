"""Online RL family (grpo, rloo, remax): advantages, surrogate, KL estimators and loss denominators by hand;
batched generation; 1 vs 2 processes; learning on the embedded task."""
import copy
import math

import pytest
import torch
from util import GRAD_REL, habit_outcome, head, metrics, run

from algos.grpo import (aggregate, cispo_loss, clipped_surrogate, grpo_advantages, importance_ratio, keep_groups,
                        kl_estimate, overlong_penalty)
from common.logps import completion_logps, group_rows, sharing_pays
from common.sampling import bf16_sampler, generate
from algos.remax import remax_advantages
from algos.rloo import reinforce_loss, rloo_advantages


def test_group_normalised_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    # group 0: mean 1/2, sample std sqrt(4 * (1/2)^2 / 3) = sqrt(1/3); group 1: no variance -> no signal
    s0 = math.sqrt(1 / 3)
    # group 2: mean 2, deviations 1, -1, 0, 0, sample std sqrt(2/3)
    s2 = math.sqrt(2 / 3)
    want = torch.tensor([[0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)],
                         [0.0, 0.0, 0.0, 0.0], [1 / (s2 + 1e-4), -1 / (s2 + 1e-4), 0.0, 0.0]])
    assert torch.allclose(grpo_advantages(r), want, atol=1e-6)
    # Dr. GRPO: centred only
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]])
    assert torch.equal(grpo_advantages(r, "none"), centred)
    # batch: centred in the group, divided by the std of all 12 rewards (Σ r = 14, Σ r² = 2 + 4 + 18 = 24)
    batch_std = math.sqrt((24 - 14 ** 2 / 12) / 11)
    assert batch_std == pytest.approx(r.flatten().std().item())
    assert torch.allclose(grpo_advantages(r, "batch", torch.tensor(batch_std)), centred / (batch_std + 1e-4))


def test_leave_one_out_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]])
    # sample i minus the mean of the other three
    want = torch.tensor([[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [3 - 1.0, 1 - 5 / 3, 2 - 4 / 3, 0 - 2.0]])
    assert torch.allclose(rloo_advantages(r), want, atol=1e-6)


def test_remax_baseline_is_the_greedy_reward():
    r = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert torch.equal(remax_advantages(r, torch.tensor([1.0, 0.0])), torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_reinforce_loss_gradient_is_minus_advantage():
    logps = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], requires_grad=True)
    loss = reinforce_loss(logps, torch.tensor([2.0, -1.0]))
    assert torch.allclose(loss, torch.tensor([[1.0, 2.0], [-2.0, -0.1]]))
    loss.sum().backward()
    assert torch.equal(logps.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))


@pytest.mark.parametrize("ratio,adv,eps_high,loss,clipped", [
    (1.1, 1.0, 0.0, -1.1, False),   # inside the range: plain ratio x advantage
    (0.9, -1.0, 0.0, 0.9, False),
    (1.5, 1.0, 0.0, -1.2, True),    # A > 0, ratio above 1 + ε: capped at 1.2, no gradient
    (0.5, 1.0, 0.0, -0.5, False),   # A > 0, ratio below 1 - ε: the min keeps the unclipped (worse) term
    (0.5, -1.0, 0.0, 0.8, True),    # A < 0, ratio below 1 - ε: floored at 0.8, no gradient
    (1.5, -1.0, 0.0, 1.5, False),   # A < 0, ratio above 1 + ε: unclipped, the loss keeps growing
    (1.25, 2.0, 0.0, -2.4, True),   # symmetric clip: 1.25 > 1.2
    (1.25, 2.0, 0.28, -2.5, False),  # DAPO clip-higher: 1.25 < 1.28 is inside
    (1.5, 2.0, 0.28, -2.56, True),
    (0.75, -2.0, 0.28, 1.6, True),  # ε_high leaves the lower bound at 1 - 0.2
])
def test_clipped_surrogate(ratio, adv, eps_high, loss, clipped):
    old = torch.tensor([[-1.0]])
    logps = (old + math.log(ratio)).requires_grad_(True)
    out, clip = clipped_surrogate(importance_ratio(logps, old, torch.ones(1, 1)), torch.tensor([adv]), 0.2, eps_high)
    assert out.item() == pytest.approx(loss, abs=1e-6) and clip.item() == clipped
    out.sum().backward()
    # d(-ρA)/d log π = -ρA where the unclipped term is active, 0 where the clip is
    assert logps.grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)


def test_sequence_level_ratio_is_one_per_completion():
    """GSPO: s_i = exp(mean_t log ρ_i,t) over the completion's own tokens, clipped once for all of them; its gradient
    reaches every token's log-prob by s_i/|o_i| (× -Â while unclipped)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -0.9]])
    logps = (old + torch.tensor([[0.2, -0.1, 5.0], [0.3, 0.3, 0.3]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the third token of completion 0 is padding
    s = importance_ratio(logps, old, mask, "sequence")
    assert s.shape == (2, 1) and torch.allclose(s[:, 0], torch.tensor([math.exp(0.05), math.exp(0.3)]))
    loss, clipped = clipped_surrogate(s, torch.tensor([2.0, 1.0]), 0.2)
    assert torch.allclose(loss, torch.tensor([[-2 * math.exp(0.05)], [-1.2]]))  # exp(0.3) = 1.35 > 1.2: capped
    assert clipped[:, 0].tolist() == [False, True]
    aggregate(loss.expand(-1, 3), mask, "sequence", 2).backward()
    want = torch.tensor([[-2 * math.exp(0.05) / 2 / 2] * 2 + [0.0], [0.0] * 3])  # (1/N)·(-Â)·s/|o|, N = 2
    assert torch.allclose(logps.grad, want)
    # on-policy both levels give ratio 1
    assert torch.equal(importance_ratio(old, old, mask, "sequence"), torch.ones(2, 1))


def test_cispo_keeps_a_gradient_where_the_clip_drops_it():
    """-sg(min(ρ, 1+ε_high))·Â·log π: the weight is the capped ratio, the gradient -w·Â per token even where
    capped; on-policy (ρ = 1) its gradient is the clipped surrogate's."""
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logps = (old + torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])).requires_grad_(True)
    ratio = importance_ratio(logps, old, torch.ones(1, 3))
    loss, capped = cispo_loss(ratio, logps, torch.tensor([2.0]), 0.2)
    w = torch.tensor([[1.2, 0.5, 1.0]])  # 1.5 capped at 1 + 0.2; no lower bound
    assert torch.allclose(loss, -w * 2.0 * logps.detach()) and capped.tolist() == [[True, False, False]]
    loss.sum().backward()
    assert torch.allclose(logps.grad, -w * 2.0)  # the clipped surrogate gives the first token 0 here
    on = old.clone().requires_grad_(True)
    cispo_loss(importance_ratio(on, old, torch.ones(1, 3)), on, torch.tensor([2.0]), 0.2)[0].sum().backward()
    clip = old.clone().requires_grad_(True)
    clipped_surrogate(importance_ratio(clip, old, torch.ones(1, 3)), torch.tensor([2.0]), 0.2)[0].sum().backward()
    assert torch.equal(on.grad, clip.grad)


def test_overlong_penalty_ramps_over_the_buffer():
    # cap 12, buffer 4: nothing up to 8 tokens, then -p·(|o| - 8)/4, -p at the cap
    got = overlong_penalty(torch.tensor([3.0, 8.0, 9.0, 10.0, 12.0]), 12, 4, 0.5)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))


def test_dynamic_sampling_keeps_groups_with_a_reward_spread():
    """Round 0: groups a (spread), b (all 0), c (all 1); round 1: d (all 0), e (spread). Three groups are kept: a, e
    (spread, in the order drawn), then b (the first flat group fills the shortfall); completions padded to the
    longest round."""
    G = 2
    def part(names, rewards, C):
        n = len(names) * G
        return {"recs": [{"name": x} for x in names], "comp": torch.arange(n * C).view(n, C) + 100,
                "mask": torch.ones(n, C, dtype=torch.bool), "ended": torch.ones(n, dtype=torch.bool),
                "sampler_logps": -torch.ones(n, C), "rewards": torch.tensor(rewards),
                "parts": {"correct": torch.tensor(rewards)}}
    rounds = [part("abc", [1.0, 0.0, 0.0, 0.0, 1.0, 1.0], 2), part("de", [0.0, 0.0, 0.0, 1.0], 3)]
    out = keep_groups(rounds, 3, G, pad_id=-7)
    assert [r["name"] for r in out["recs"]] == ["a", "e", "b"]
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert torch.equal(out["parts"]["correct"], out["rewards"])  # each reward function's values follow their groups
    assert out["comp"].shape == (6, 3) and out["comp"][0].tolist() == [100, 101, -7]
    assert out["comp"][2].tolist() == rounds[1]["comp"][2].tolist()
    assert out["mask"][0].tolist() == [True, True, False] and out["sampler_logps"][0].tolist() == [-1.0, -1.0, 0.0]


def test_token_and_sequence_mean_denominators():
    loss = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token", 4).item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # every token weighs the same
    assert aggregate(loss, mask, "sequence", 2).item() == pytest.approx((2 + 4) / 2)  # every completion weighs the same
    # the denominator is the global count: two halves of a batch, each over the global count, add up to the whole
    halves = aggregate(loss[:1], mask[:1], "token", 4) + aggregate(loss[1:], mask[1:], "token", 4)
    assert halves.item() == pytest.approx(2.5)
    assert aggregate(loss, torch.zeros_like(mask), "token", 0).item() == 0.0  # fully masked: 0, not NaN


def test_kl_estimators_by_monte_carlo():
    p, q = torch.tensor([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.1, 0.2, 0.3, 0.4])  # π and π_ref
    kl = (p * (p / q).log()).sum()
    Categorical = torch.distributions.Categorical
    assert kl.item() == pytest.approx(torch.distributions.kl_divergence(Categorical(p), Categorical(q)).item())
    y = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[y], q.log()[y]
    est = {k: kl_estimate(lp, lq, k) for k in ("k1", "k2", "k3")}
    se = {k: v.std().item() / math.sqrt(len(y)) for k, v in est.items()}
    assert abs(est["k1"].mean() - kl) < 4 * se["k1"]  # unbiased
    assert abs(est["k3"].mean() - kl) < 4 * se["k3"]  # unbiased
    assert (est["k3"] >= 0).all() and se["k3"] < se["k1"]  # non-negative, and lower variance here
    exact_k2 = (p * (q / p).log() ** 2 / 2).sum()  # E[k2] in closed form: not the KL
    assert abs(est["k2"].mean() - exact_k2) < 4 * se["k2"] and abs(exact_k2 - kl) > 50 * se["k2"]


def test_k3_as_a_loss_differentiates_the_reverse_kl():
    """E_π[∇ k3] = ∇ KL(π_ref ‖ π) and E_π[∇ k2] = ∇ KL(π ‖ π_ref) (verl PR #2953),
    by exact expectation over categories."""
    logits = torch.tensor([1.0, 0.2, -0.5, -1.0], requires_grad=True)
    lq = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()

    def grad(f):
        logits.grad = None
        f(logits.log_softmax(-1)).backward()
        return logits.grad.clone()

    p_fixed = logits.softmax(-1).detach()  # the sampling distribution: no gradient flows through the samples
    g_k3 = grad(lambda lp: (p_fixed * kl_estimate(lp, lq, "k3")).sum())
    g_k2 = grad(lambda lp: (p_fixed * kl_estimate(lp, lq, "k2")).sum())
    g_forward = grad(lambda lp: (lp.exp() * (lp - lq)).sum())  # ∇ KL(π ‖ π_ref)
    g_reverse = grad(lambda lp: (lq.exp() * (lq - lp)).sum())  # ∇ KL(π_ref ‖ π)
    assert torch.allclose(g_k3, g_reverse, atol=1e-6) and torch.allclose(g_k2, g_forward, atol=1e-6)
    assert not torch.allclose(g_k3, g_forward, atol=1e-2)


def one_row_logps(model, prompt, comp):
    """Reference: log-probs of comp after prompt in a single unpadded row, by log_softmax."""
    ids = torch.tensor([prompt + comp])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def sft(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.template import encode_prompt
    tok = AutoTokenizer.from_pretrained(sft_run)
    model = AutoModelForCausalLM.from_pretrained(sft_run, attn_implementation="sdpa").eval()
    qs = ["1+1", "77-13", "5-0", "98+87", "30-28", "6+6"]  # prompts of different lengths: different left padding
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {q}?"}]) for q in qs]
    assert len(set(map(len, prompts))) > 1
    return model, tok, prompts


def test_batched_left_padded_generation_matches_one_at_a_time(sft):
    from transformers import GenerationConfig
    model, tok, prompts = sft
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    cpu = torch.device("cpu")
    comp, mask, ended = generate(model, prompts, 1, tok, cfg, cpu)
    assert ended.any()
    for i, p in enumerate(prompts):
        one, one_mask, _ = generate(model, [p], 1, tok, cfg, cpu)
        n = int(one_mask.sum())
        assert comp[i, :n].tolist() == one[0, :n].tolist() and int(mask[i].sum()) == n
        # the masked completion ends at its first EOS (included); everything after it is padding
        row = comp[i].tolist()
        if ended[i]:
            assert row.index(tok.eos_token_id) == n - 1 and all(t == tok.pad_token_id for t in row[n:])
        else:
            assert n == comp.shape[1] and tok.eos_token_id not in row


def test_static_cache_samples_what_the_dynamic_cache_samples(sft):
    """--static_cache (on by default for one CUDA process): a fixed-size cache, each row prefilling its own copy of the
    prompt, against the prompt prefilled once and its cache copied to the G rows: same seed, same samples."""
    from transformers import GenerationConfig
    model, tok, prompts = sft
    cfg = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    samples = []
    for static_len in (0, max(map(len, prompts)) + 8):  # 0: the dynamic cache; else exactly prompt + completion
        torch.manual_seed(0)
        samples.append(generate(model, prompts, 3, tok, cfg, torch.device("cpu"), static_len=static_len))
    (comp, mask, ended), (comp_s, mask_s, ended_s) = samples
    assert torch.equal(comp, comp_s) and torch.equal(mask, mask_s) and torch.equal(ended, ended_s)
    assert len(set(map(tuple, comp.tolist()))) > 1  # sampled, not a constant


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampled_logps_are_the_samplers(sft, top_p):
    """generate(..., sampled_logps=True) draws the same tokens, and returns the log-prob of each under the tempered
    distribution it was drawn from: the training forward's log softmax(logits/T) at top_p 1, the renormalised nucleus
    (never below it) at top_p < 1; padding after EOS is 0."""
    from transformers import GenerationConfig
    model, tok, prompts = sft
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_p=top_p, top_k=0, max_new_tokens=8,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    comp, mask, ended = generate(model, prompts, 3, tok, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    comp_r, mask_r, ended_r, sampler = generate(model, prompts, 3, tok, cfg, torch.device("cpu"), sampled_logps=True)
    assert torch.equal(comp, comp_r) and torch.equal(mask, mask_r) and torch.equal(ended, ended_r)
    train, _ = completion_logps(model, group_rows(prompts, comp, 3, tok.pad_token_id, False), comp.shape[1], 0.7,
                                torch.device("cpu"))
    assert (sampler[~mask] == 0).all() and not mask.all()  # some sample ended early
    if top_p == 1.0:
        assert torch.allclose(sampler[mask], train[mask], atol=1e-5)
    else:
        assert (sampler[mask] >= train[mask] - 1e-5).all() and (sampler[mask] > train[mask] + 1e-3).any()


def test_bf16_sampler_is_the_policy_in_bf16(sft):
    """With the fixed-size cache on one GPU, the sampling scripts decode with bf16_sampler's copy: bf16 casts of the
    policy's parameters (tied ones still tied), without gradients, refreshed in place after an update; the policy
    keeps its fp32 weights, and the copy samples with the fixed-size cache."""
    from transformers import GenerationConfig
    model, tok, prompts = sft
    policy = copy.deepcopy(model)
    sampler = bf16_sampler(policy)
    mine, theirs = dict(sampler.named_parameters()), dict(policy.named_parameters())
    assert mine.keys() == theirs.keys() and not sampler.training
    for name, p in theirs.items():
        assert p.dtype == torch.float32 and mine[name].dtype == torch.bfloat16 and not mine[name].requires_grad
        assert torch.equal(mine[name], p.detach().bfloat16()), name
    if policy.config.tie_word_embeddings:
        assert sampler.get_output_embeddings().weight is sampler.get_input_embeddings().weight
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)  # an update
    assert bf16_sampler(policy, sampler) is sampler
    assert all(torch.equal(mine[n], p.detach().bfloat16()) for n, p in theirs.items())
    cfg = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    comp, mask, _ = generate(sampler, prompts, 2, tok, cfg, torch.device("cpu"), static_len=max(map(len, prompts)) + 8)
    assert comp.shape == (2 * len(prompts), 8) and mask[:, 0].all()


def test_prompt_sharing_pays_by_the_flop_count(base):
    """sharing_pays on the Qwen2-0.5B shape, against the count done by hand. A layer's weights per token:
    q, o 896·896 each, k, v 896·128 each (2 KV heads of 64), the gated MLP 3·896·4864: p = 14,909,440; a
    (query, key) pair costs 4·896 FLOPs to a token's 2p, so pair = 3584 / 29,818,880 = 1.2019e-4 tokens.
    W = 50, C = 256, G = 8: shared 2098 + 1.2019e-4·2098² = 2627.0 against a row each 8·(306 + 1.2019e-4·306²)
    = 2538.0, times 0.8 = 2030.4: no. W = 200, C = 128: shared 1224 + 180.1 = 1404.1 against 0.8·8·(328 + 12.9)
    = 2182.0: yes. At W = 200 the two sides meet between C = 296 (3360.6 against 3363.6) and 297 (3373.6 against
    3370.8). The embedded task (a 2-layer model, prompts of about 32 tokens, 12 new tokens): yes, so its
    runs keep the layout their tests were calibrated on."""
    from transformers import AutoConfig, Qwen2Config

    q05 = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2)
    assert not sharing_pays(q05, 50, 256, 8)
    assert sharing_pays(q05, 200, 128, 8)
    assert sharing_pays(q05, 200, 296, 8) and not sharing_pays(q05, 200, 297, 8)
    assert sharing_pays(AutoConfig.from_pretrained(base), 32, 12, 8)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_batched_logps_match_one_row_each(sft, share_prompt):
    """Sampled groups, laid out with the prompt shared by its group (4D mask) or one padded row each, against one
    unpadded row per completion: position ids and masks give every completion the logits of a row of its own."""
    from transformers import GenerationConfig
    model, tok, prompts = sft
    G = 3
    cfg = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    comp, mask, _ = generate(model, prompts, G, tok, cfg, torch.device("cpu"))
    with torch.no_grad():
        rows = group_rows(prompts, comp, G, tok.pad_token_id, share_prompt)
        logps, ents = completion_logps(model, rows, comp.shape[1], 1.0, torch.device("cpu"))
    for i in range(len(comp)):
        n = int(mask[i].sum())
        assert torch.allclose(logps[i, :n], one_row_logps(model, prompts[i // G], comp[i, :n].tolist()), atol=1e-5)
    assert (ents > 0).all()


@pytest.mark.parametrize("algo,extra", [("grpo", []), ("rloo", []), ("remax", []),
                                        ("grpo", ["--scale_rewards", "batch", "--dynamic_sampling", 2,
                                                  "--importance_sampling_level", "sequence", "--num_iterations", 2]),
                                        ("grpo", ["--lora_r", 4, "--beta", 0.04, "--lr", 1e-2])])  # ref: adapters off
def test_two_processes_give_the_same_loss(algo, extra, sft_run, tmp_path):
    """4 prompts a step, each sampled group_size times: 1 process with 2 micro-batches of 2 prompts against 2
    processes with 2 prompts each (the batch's reward std and dynamic sampling's extra prompts included)."""
    common = ["--model", sft_run, "--eval_data", head("eval.jsonl", tmp_path / "eval_16.jsonl", 16), "--max_steps", 3,
              "--log_every", 1, "--eval_every", 0,
              "--save_every", 0, "--batch_size", 2, "--lr", 1e-3, *extra]
    run(algo, "--output_dir", tmp_path / "one", "--grad_accum", 2, *common)
    run(algo, "--output_dir", tmp_path / "two", *common, nproc=2)
    one, two = [[m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two")]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)
    assert any(abs(m["loss"]) > 1e-3 for m in one)  # the comparison is not of zeros


def test_grpo_options_run(sft_run, tmp_path):
    """The non-default paths: several updates per batch (the clip acts), KL in the reward, per-sequence mean,
    masked truncations, one padded row per completion, Dr. GRPO advantages, clip-higher."""
    run("grpo", "--model", sft_run, "--data", head("rl.jsonl", tmp_path / "rl_32.jsonl", 32),
        "--eval_data", head("eval.jsonl", tmp_path / "eval_8.jsonl", 8),
        "--output_dir", tmp_path / "out", "--max_steps", 2, "--log_every", 1, "--eval_every", 0, "--save_every", 0,
        "--lr", 1e-3, "--num_iterations", 3, "--kl_placement", "reward", "--kl_estimator", "k2",
        "--loss_agg", "sequence", "--mask_truncated", "true",
        "--share_prompt", "false", "--scale_rewards", "none", "--clip_eps_high", 0.28)
    m = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert len(m) == 2 and all(math.isfinite(r["loss"]) for r in m)
    assert m[-1]["approx_kl"] > 0 and m[-1]["kl"] > 0  # later passes are off-policy; the policy has left the reference


def test_grpo_variants_run(sft_run, tmp_path):
    """CISPO, dynamic sampling, the overlong penalty and truncated importance sampling together (GSPO and batch-scaled
    advantages run in the two-process test): each logs what it adds; dynamic sampling draws extra groups and keeps
    fewer flat ones."""
    run("grpo", "--model", sft_run, "--data", head("rl.jsonl", tmp_path / "rl_64.jsonl", 64), "--eval_data", "",
        "--max_steps", 2, "--log_every", 1, "--save_every", 0, "--lr", 1e-3, "--num_iterations", 2,
        "--output_dir", tmp_path / "out", "--loss_type", "cispo", "--dynamic_sampling", 3, "--overlong_buffer", 10,
        "--overlong_penalty", 0.5, "--tis_cap", 2.0)
    m = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert len(m) == 2 and all(math.isfinite(r["loss"]) and r["mismatch_k3"] < 1e-6 for r in m)  # fp32 CPU
    assert all(r["extra_groups"] > 0 and r["frac_zero_std_kept"] < r["frac_zero_std"] for r in m)
    assert all(-0.5 <= r["reward/overlong"] < 0 for r in m)  # some completions reach the buffer


@pytest.mark.parametrize("algo", ["grpo", "rloo", "remax"])
def test_raises_held_out_accuracy(algo, sft_run, tok, tmp_path):
    """The defaults, cut to 40 of 150 steps. The SFT model copied its demonstrations' habit of restating the first
    number on subtractions (common/toy.py); the verifier never rewards it, so its probability on held-out subtractions,
    problems never trained on, must fall, while greedy accuracy holds (it rises on this machine's kernels)."""
    run(algo, "--model", sft_run, "--output_dir", tmp_path / "out", "--max_steps", 40, "--log_every", 5,
        "--eval_every", 0, "--save_every", 0)
    acc, echo = habit_outcome(algo, sft_run, tmp_path / "out", tok)
    m = metrics(tmp_path / "out")
    # Over seeds 0-2 x the kernel paths (this machine's avx512, ATEN_CPU_CAPABILITY=avx2 and default), each from that
    # run's SFT model, at 40 steps: P(echo) fell to 0.22-0.81 of its start (worst: remax, avx2 seed 2; at 25 steps it
    # was 0.84 there), greedy accuracy changed by -0.032 (grpo, default seed 0) to +0.180. Longer budgets trade one
    # margin for the other: at 60 steps the habit recedes further everywhere, but additions lose a little and
    # accuracy fell 0.047 (grpo, avx2 seed 0). The sampled reward of one step's batch swings with its mix of
    # additions and subtractions and is not asserted.
    assert echo[1] < 0.85 * echo[0]
    assert acc[-1] > acc[0] - 0.05
    keys = ("kl", "entropy", "response_length", "distinct2", "frac_zero_std", "reward/std", "loss", "grad_norm")
    assert all(k in m[-1] for k in keys)


GRPO_VARIANTS = {  # GSPO (with its paper's clip range) and CISPO off-policy, where their ratios act; DAPO's sampling
    "gspo": ["--importance_sampling_level", "sequence", "--loss_agg", "sequence", "--num_iterations", 2,
             "--clip_eps", 3e-4, "--clip_eps_high", 4e-4],
    "cispo": ["--loss_type", "cispo", "--num_iterations", 2],
    "dynamic_sampling": ["--dynamic_sampling", 3],
}


@pytest.mark.parametrize("variant", list(GRPO_VARIANTS))
def test_grpo_variant_learns(variant, sft_run, tok, tmp_path):
    """The learning test of grpo above (40 steps from SFT), with each variant: the habit recedes, accuracy holds."""
    run("grpo", "--model", sft_run, "--output_dir", tmp_path / "out", "--max_steps", 40, "--log_every", 5,
        "--eval_every", 0, "--save_every", 0, *GRPO_VARIANTS[variant])
    acc, echo = habit_outcome(f"grpo {variant}", sft_run, tmp_path / "out", tok)
    # Over seeds 0-2 x the kernel paths (avx512 here, ATEN_CPU_CAPABILITY=avx2 and default, runs/toy built under each),
    # each from that cell's SFT model: P(echo) fell to 0.19-0.66 of its start (gspo), 0.21-0.69 (cispo), 0.19-0.63
    # (dynamic_sampling); accuracy changed by -0.031 to +0.164, -0.051 to +0.148 (cispo, default seed 0) and -0.016
    # to +0.160 (plain grpo in the same cells: 0.22-0.74 and -0.031 to +0.172). The guard on accuracy is wider than
    # the plain test's: CISPO's worst cell came within 0.001 of its 0.05.
    assert echo[1] < 0.85 * echo[0]
    assert acc[-1] > acc[0] - 0.08


def test_user_data_without_eval_set_logs_no_eval_keys(base, tmp_path):
    """With a user's --data and no --eval_data nothing is evaluated (and no embedded eval set is read): the metrics
    lines simply lack eval keys."""
    run("grpo", "--model", base, "--data", head("rl.jsonl", tmp_path / "rl_8.jsonl", 8),
        "--output_dir", tmp_path / "out", "--max_steps", 2, "--batch_size", 2, "--group_size", 2, "--save_every", 0)
    m = metrics(tmp_path / "out")
    assert [r["step"] for r in m if "loss" in r] == [1, 2]
    assert not any(k.startswith("eval/") for r in m for k in r)
