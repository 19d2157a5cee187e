"""GRPO: group relative policy optimization, a PPO-style clipped objective with no critic.

Each prompt q gets G sampled completions o_1..o_G, each rewarded by a verifier (exact match of the
final answer). The advantage of every token of o_i is its reward normalised within its group,
Â_i = (r_i - mean(r)) / (std(r) + ε), and the policy maximises the clipped surrogate with a per-token
KL penalty to a frozen reference policy, averaged over every completion token of the global batch:

    J(θ) = (1/N) Σ_i Σ_t [ min(ρ_i,t Â_i, clip(ρ_i,t, 1-ε_low, 1+ε_high) Â_i) - β·k3_i,t ],
    ρ_i,t = πθ(o_i,t | q, o_i,<t) / πθ_old(o_i,t | q, o_i,<t),   N = Σ_i |o_i|

Variants, each a flag whose default is the objective above:
  --scale_rewards batch|none: Â_i's divisor is the std of every reward of the step's batch (Lite PPO, arXiv:2508.08221;
      REINFORCE++-baseline, arXiv:2501.03262, divides by the std of the centred advantages instead), or 1 (Dr. GRPO).
  --importance_sampling_level sequence (GSPO, arXiv:2507.18071): one ratio per completion, clipped per completion,
      s_i = exp((1/|o_i|) Σ_t log ρ_i,t); it differs from token ratios only off-policy (--num_iterations > 1). The
      paper clips at ε_low 3e-4, ε_high 4e-4 and averages per completion (--loss_agg sequence).
  --loss_type cispo (MiniMax-M1, arXiv:2506.13585): J = (1/N) Σ_i Σ_t sg(min(ρ_i,t, 1+ε_high)) Â_i log πθ(o_i,t):
      the ratio is clipped as a weight, so every token keeps a gradient (the paper's lower bound left open, as in TRL).
  --dynamic_sampling K (DAPO): groups whose task rewards are all equal carry no policy gradient; they are replaced
      by groups of new prompts, drawn in up to K extra rounds (a shortfall is filled with the dropped groups).
  --overlong_buffer L --overlong_penalty p (DAPO): r_i - p·clamp((|o_i| - (max_new_tokens - L)) / L, 0, 1).
  --tis_cap C (Yao et al. 2025, truncated importance sampling): the policy-gradient term of each token is weighted by
      min(π_train(o_t) / π_sampler(o_t), C), fixed at sampling, where π_sampler is what generate drew from (its
      dtype, cache and top-p), π_train the forward that trains; mismatch_k3 logs k3 of KL(π_sampler ‖ π_train).
Reference: DeepSeekMath, arXiv:2402.03300 (§4.1); KL estimators k1/k2/k3: Schulman, "Approximating
KL divergence" (2020); ε_high: DAPO, arXiv:2503.14476.
Deviations from the paper:
  1. The loss is a token-level mean over the global batch (DAPO), not the paper's per-sequence mean
     (1/G Σ_i 1/|o_i| Σ_t), which weighs a token of a short completion more; --loss_agg sequence restores it.
  2. k3 in the loss is the paper's choice, but its gradient is biased (verl PR #2953):
     E_π[∇θ k3] = -Σ_y π_ref(y) ∇θ log πθ(y) = ∇θ KL(π_ref ‖ πθ),
     the reverse KL, not ∇θ KL(πθ ‖ π_ref).
     --kl_estimator k2 gives the gradient of KL(πθ ‖ π_ref) itself; k1 in the loss has zero expected
     gradient; --kl_placement reward moves the penalty into the reward (-β Σ_t k_t per completion) instead.
  3. Log-probs are of the tempered policy softmax(logits / T) that sampled (as in TRL), top-p aside.
  4. Sampling is seeded per micro-batch: samples (and the loss) do not depend on the process count.
Data: JSONL, {"prompt": ..., "answer": ...} (prompt: a string or a message list); reward = common.toy.verify, or
the weighted sum of --reward_fn functions of the completion and its record (common/rewards.py; "answer" optional).
Run:  python algos/grpo.py
      torchrun --nproc_per_node 8 algos/grpo.py --model runs/sft --data prompts.jsonl --max_new_tokens 256
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, get_constant_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import completion_logps, group_rows, sharing_pays  # noqa: E402
from common.models import adamw, load_config, load_model, load_tokenizer, start_run  # noqa: E402
from common.rewards import load_rewards, reward  # noqa: E402
from common.sampling import bf16_sampler, distinct2, generate  # noqa: E402
from common.template import encode_prompt  # noqa: E402


@dataclass
class Args:
    group_size: int = 8  # G: completions per prompt
    beta: float = 0.04  # KL coefficient β (0: no reference model is loaded)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token estimator of KL(πθ ‖ π_ref)
    kl_placement: Literal["loss", "reward"] = "loss"  # loss: β·k in the per-token loss | reward: -β Σ_t k_t in r
    clip_eps: float = 0.2  # ε_low of the ratio clip
    clip_eps_high: float = 0.0  # ε_high (DAPO's clip-higher); 0: same as clip_eps
    scale_rewards: Literal["group", "batch", "none"] = "group"  # Â's divisor: the group's reward std, the batch's, 1
    loss_agg: Literal["token", "sequence"] = "token"  # token: Σ ℓ / global token count | sequence: mean of seq means
    loss_type: Literal["clip", "cispo"] = "clip"  # clip: clipped surrogate | cispo: sg(min(ρ, 1+ε_high))·Â·log π
    importance_sampling_level: Literal["token", "sequence"] = "token"  # ρ per token, or one per completion (GSPO)
    num_iterations: int = 1  # μ: optimizer steps on each sampled batch, against its stored old log-probs
    mask_truncated: bool = False  # completions that hit max_new_tokens without EOS carry no loss (DAPO)
    dynamic_sampling: int = 0  # K: extra sampling rounds that replace groups with equal task rewards (0: off; DAPO)
    overlong_buffer: int = 0  # L: the last tokens before max_new_tokens over which a length penalty grows (0: off)
    overlong_penalty: float = 1.0  # p: the penalty at max_new_tokens (DAPO's soft overlong punishment)
    tis_cap: float = 0.0  # C: weight each token's policy gradient by min(π_train/π_sampler, C) (0: off)
    # (the ratio is over the full vocabulary while sampling with --top_p < 1 drew from the nucleus: it is then < 1)
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # frozen reference policy of the KL penalty; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    reward_fn: list[str] = field(default_factory=list)  # FILE.py:NAME[:WEIGHT], repeatable; default: the verifier
    output_dir: str = "runs/grpo"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    batch_size: int = 16  # prompts per process per micro-batch (each sampled group_size times)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_new_tokens: int = 12  # completion length limit
    temperature: float = 1.0  # sampling temperature (log-probs are of the tempered policy)
    top_p: float = 1.0  # nucleus sampling
    lr: float = 2e-4  # learning rate (AdamW), constant after warmup
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 150  # sampled batches (each gives num_iterations optimizer steps); 0: --epochs over the prompts
    epochs: int = 1  # passes over the prompts when max_steps is 0
    warmup_ratio: float = 0.0  # fraction of optimizer steps of linear warmup
    seed: int = 0  # seed of the prompt order, the sampling and every RNG
    log_every: int = 1  # steps between metrics lines (each line reports its own step's rollout)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 50  # steps between evaluations (0: only at the start and the end)
    save_every: int = 50  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    # LoRA (peft, arXiv:2106.09685): low-rank adapters train, the model's own weights stay frozen
    lora_r: int = 0  # rank of the adapters; 0: full fine-tuning, every parameter trains
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: str = "all-linear"  # comma-separated module names; all-linear: every linear layer but the head
    merge_lora: bool = False  # also save the merged model (base + adapters folded in) in output_dir/merged
    # Speed and memory: none of these changes the loss
    static_cache: Literal["auto", "true", "false"] = "auto"  # fixed-size KV cache, compiled decode; auto: 1 CUDA proc
    share_prompt: Literal["auto", "true", "false"] = "auto"  # each prompt computed once for its group (group_rows)
    # (auto: where it saves compute by sharing_pays' count, from the data's mean prompt length and max_new_tokens)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute


def grpo_advantages(rewards_BG, scale_rewards="group", batch_std=None, eps=1e-4):
    """Â_i = (r_i - mean_j r_j) / (s + ε), the mean within each group (row); s: the group's std (group), batch_std,
    the std of every reward of the step's batch, given by the caller (batch), or no division (none). Stds with
    Bessel's correction."""
    adv_BG = rewards_BG - rewards_BG.mean(-1, keepdim=True)
    if scale_rewards == "group":
        return adv_BG / (rewards_BG.std(-1, keepdim=True) + eps)
    return adv_BG / (batch_std + eps) if scale_rewards == "batch" else adv_BG


def importance_ratio(logps_BT, old_logps_BT, mask_BT, level="token"):
    """token: ρ_i,t = πθ(o_i,t) / πθ_old(o_i,t), shape (B, T); sequence (GSPO): one ratio per completion, (B, 1),
    s_i = exp((1/|o_i|) Σ_t log ρ_i,t), the length-normalised ratio, its gradient flowing through every token."""
    log_ratio_BT = logps_BT - old_logps_BT
    if level == "token":
        return torch.exp(log_ratio_BT)
    return torch.exp((log_ratio_BT * mask_BT).sum(-1, keepdim=True) / mask_BT.sum(-1, keepdim=True).clamp(min=1))


def clipped_surrogate(ratio_BT, adv_B, clip_eps, clip_eps_high=0.0):
    """Per-token loss -min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â) and where the clip is active (its gradient is 0);
    ρ per token (B, T) or per completion (B, 1), then the same for each of its tokens."""
    adv_BT = adv_B[:, None]
    clipped_BT = ratio_BT.clamp(1 - clip_eps, 1 + (clip_eps_high or clip_eps))
    loss_BT = -torch.min(ratio_BT * adv_BT, clipped_BT * adv_BT)
    return loss_BT, (clipped_BT * adv_BT < ratio_BT * adv_BT)


def cispo_loss(ratio_BT, logps_BT, adv_B, clip_eps_high):
    """CISPO per-token loss -sg(min(ρ, 1+ε_high))·Â·log πθ, and where the cap is active. The capped ratio is a
    constant weight on REINFORCE's term: a capped token still gets the gradient -w·Â·∇log πθ, where the clipped
    surrogate gives it none. On-policy (ρ = 1) both give the gradient -Â·∇log πθ."""
    weight_BT = ratio_BT.clamp(max=1 + clip_eps_high).detach()
    return -weight_BT * adv_B[:, None] * logps_BT, ratio_BT.detach() > 1 + clip_eps_high


def overlong_penalty(lengths_B, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - L tokens, then falling linearly to -p at the cap."""
    return -penalty * ((lengths_B - (max_new_tokens - buffer)) / buffer).clamp(0, 1)


def spread(rewards_BG):
    """Groups whose rewards are not all equal: only they carry a policy gradient (DAPO's dynamic-sampling filter)."""
    return rewards_BG.amax(-1) > rewards_BG.amin(-1)


def kl_estimate(logps, ref_logps, kind="k3"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π, with log r = log π_ref - log π:
    k1 = -log r (unbiased), k2 = (log r)²/2 (biased, low variance), k3 = r - 1 - log r (unbiased, ≥ 0)."""
    log_r = ref_logps - logps
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return log_r ** 2 / 2
    return torch.exp(log_r) - 1 - log_r  # k3


def aggregate(loss_BT, mask_BT, loss_agg, n_global):
    """token: Σ_i Σ_t ℓ / N, N the global completion-token count; sequence: Σ_i (1/|o_i|) Σ_t ℓ / N,
    N the global count of completions with a loss token. A micro-batch without loss tokens contributes exactly 0."""
    if loss_agg == "token":
        return (loss_BT * mask_BT).sum() / max(n_global, 1)
    return ((loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum() / max(n_global, 1)


def load_prompts(path, tok, args, need_answer=True):
    """-> [(prompt ids, answer)]; prompts leaving fewer than max_new_tokens of max_len are dropped (and counted)."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        ids = encode_prompt(tok, prompt)
        answer = data.field(rec, where, "answer", str) if need_answer or "answer" in rec else None
        if len(ids) + args.max_new_tokens > args.max_len:
            n_long += 1
        else:
            recs.append({"ids": ids, "prompt": rec["prompt"], "answer": answer, "record": rec, "where": where})
    return recs, n_long


@torch.no_grad()
def sample_groups(policy, recs, fns, tok, gen_cfg, args, static_len, device):
    """G samples of each prompt, the sampler's log-probs of them, and their task rewards (the verifier, or
    Σ_k w_k·f_k(completion, record) of the reward functions, each also kept apart in parts)."""
    G = args.group_size
    comp, mask, ended, sampler_logps = generate(policy, [r["ids"] for r in recs], G, tok, gen_cfg, device,
                                                dist.rank_world()[1] > 1, static_len, sampled_logps=True)
    texts = tok.batch_decode(comp, skip_special_tokens=True)  # on the host: the sampling has finished
    each = [r for r in recs for _ in range(G)]
    rewards, parts = reward(fns, texts, [r["record"] for r in each], [r["where"] for r in each], device)
    return dict(recs=recs, comp=comp, mask=mask, ended=ended, sampler_logps=sampler_logps, rewards=rewards,
                parts=parts)


def keep_groups(rounds, n, G, pad_id):
    """Dynamic sampling's batch: the first n groups with a reward spread, in the order drawn, then
    (a shortfall) the first groups without one; completions padded to the longest round."""
    spreads = [(k, j) for k, r in enumerate(rounds) for j, ok in enumerate(spread(r["rewards"].view(-1, G))) if ok]
    flats = [(k, j) for k, r in enumerate(rounds) for j in range(len(r["recs"])) if (k, j) not in set(spreads)]
    chosen = (spreads + flats)[:n]
    C = max(r["comp"].shape[1] for r in rounds)
    pads = {"comp": pad_id, "mask": False, "sampler_logps": 0.0}
    out = {"recs": [rounds[k]["recs"][j] for k, j in chosen]}
    for key in ("comp", "mask", "ended", "sampler_logps", "rewards"):
        rows = [rounds[k][key][j * G:(j + 1) * G] for k, j in chosen]
        if key in pads:
            rows = [F.pad(x, (0, C - x.shape[1]), value=pads[key]) for x in rows]
        out[key] = torch.cat(rows)
    out["parts"] = {name: torch.cat([rounds[k]["parts"][name][j * G:(j + 1) * G] for k, j in chosen])
                    for name in rounds[0]["parts"]}
    return out


@torch.no_grad()
def rollout(policy, ref, recs, seed, pool, fns, tok, gen_cfg, args, share, static_len, device):
    """G samples per prompt, their rewards and the reference log-probs, without gradients. The sampling policy's own
    log-probs come from the first update pass (on-policy): no forward of their own. With dynamic sampling, rounds of
    len(recs) prompts drawn from pool are sampled until len(recs) groups have a reward spread, or K extra rounds."""
    torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
    draw = torch.Generator().manual_seed(seed)  # dynamic sampling's extra prompts: by the same seed
    t_gen, G = time.time(), args.group_size
    rounds = [sample_groups(policy, recs, fns, tok, gen_cfg, args, static_len, device)]
    n_spread, needed = spread(rounds[0]["rewards"].view(-1, G)).sum().item(), 1  # rounds this micro-batch needed
    while args.dynamic_sampling and len(rounds) <= args.dynamic_sampling:
        # processes sample together (a generate call gathers FSDP weights), so a round runs while any one needs it;
        # a process already full discards it, so its batch is what it would be alone
        if not dist.all_sum(float(n_spread < len(recs))).item():
            break
        more = [pool[j] for j in torch.randperm(len(pool), generator=draw, device="cpu")[:len(recs)].tolist()]
        rounds.append(sample_groups(policy, more, fns, tok, gen_cfg, args, static_len, device))
        if n_spread < len(recs):
            n_spread, needed = n_spread + spread(rounds[-1]["rewards"].view(-1, G)).sum().item(), needed + 1
    used = rounds[:needed]
    batch = used[0] if needed == 1 else keep_groups(used, len(recs), G, tok.pad_token_id)
    t_gen = time.time() - t_gen
    prompt_ids, comp, mask = [r["ids"] for r in batch["recs"]], batch["comp"], batch["mask"]
    rows = group_rows(prompt_ids, comp, G, tok.pad_token_id, share)
    C = comp.shape[1]
    ref_logps = completion_logps(ref, rows, C, args.temperature, device)[0] if ref is not None else None
    score = batch["rewards"]  # the task reward, shaped below: dynamic sampling filtered on the task reward
    if args.overlong_buffer:
        score = score + overlong_penalty(mask.sum(-1), args.max_new_tokens, args.overlong_buffer,
                                         args.overlong_penalty)
    if args.mask_truncated:
        mask = mask & batch["ended"][:, None]
    n_tokens = sum(len(r["ids"]) for d in rounds for r in d["recs"]) * G + sum(d["mask"].sum().item() for d in rounds)
    flat_first = len(recs) - spread(rounds[0]["rewards"].view(-1, G)).sum().item()
    return dict(rows=rows, comp=comp, C=C, mask=mask.float(), rewards=batch["rewards"], parts=batch["parts"],
                score=score, sampler_logps=batch["sampler_logps"], ref_logps=ref_logps, n_tokens=n_tokens,
                generate_s=t_gen, extra_groups=sum(len(d["recs"]) for d in used[1:]), flat_first=flat_first)


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    static = data.resolve(args.static_cache, auto=device.type == "cuda" and world == 1)
    static_len = args.max_len if static else 0  # positions of the sampling cache (0: a dynamic cache)
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("rl.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)
    if args.group_size < 2:
        data.fail("--group_size must be at least 2 (the advantage compares samples of the same prompt)")
    if args.scale_rewards == "batch" and args.kl_placement == "reward" and args.beta > 0:
        data.fail("--scale_rewards batch needs every score of the batch before the first update; with --kl_placement "
                  "reward the scores hold the KL of that update's forward: use --kl_placement loss")
    if not 0 <= args.overlong_buffer <= args.max_new_tokens:
        data.fail(f"--overlong_buffer {args.overlong_buffer} must lie in 0..max_new_tokens={args.max_new_tokens}")
    if args.importance_sampling_level == "sequence" and args.loss_agg == "token":
        say("--importance_sampling_level sequence with --loss_agg token weighs each completion's ratio by its length; "
            "GSPO averages over completions (--loss_agg sequence)")
    if args.tis_cap and args.top_p < 1:
        say(f"--tis_cap with --top_p {args.top_p}: π_train is over the full vocabulary, the sampler's over the "
            "nucleus, so the weights fall below 1 by the mass outside it")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    fns = load_rewards(args.reward_fn)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    prompts, n_long = load_prompts(args.data, tok, args, need_answer=not args.reward_fn)
    eval_prompts = load_prompts(args.eval_data, tok, args)[0] if args.eval_data else []
    eval_recs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in eval_prompts]
    say(f"{len(prompts)} prompts; {n_long} longer than max_len={args.max_len} - max_new_tokens were dropped")
    P = args.batch_size * args.grad_accum * world  # prompts per step
    if len(prompts) < P:
        data.fail(f"{args.data}: {len(prompts)} prompts, fewer than one global batch of {P}")
    reward(fns, [""], [prompts[0]["record"]], [prompts[0]["where"]], device)  # a function that fails, fails now
    steps_per_epoch = len(prompts) // P
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Models: the policy, and a frozen reference when β > 0, in eval mode (dropout is off in both, TRL #744). The
    # shared-prompt layout's 4D mask needs sdpa: flash-attn's varlen kernels cannot express it.
    mean_prompt = sum(len(r["ids"]) for r in prompts) / len(prompts)
    pays = sharing_pays(load_config(args.model, args.trust_remote_code), mean_prompt, args.max_new_tokens,
                        args.group_size)
    share = data.resolve(args.share_prompt, auto=pays)
    if args.share_prompt == "auto":
        say(f"--share_prompt auto: {share} (mean prompt {mean_prompt:.0f} tokens, {args.max_new_tokens} new tokens)")
    attn = "sdpa" if share else None
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code, attn=attn), args)
    model = dist.shard(model, world, device).eval()
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    ref = None
    if args.beta > 0 and args.lora_r and args.ref_model == args.model:
        ref = lora.adapters_off(model)  # the starting model: the policy with its adapters disabled, no second copy
    elif args.beta > 0:
        ref = load_model(args.ref_model, tok, device, args.trust_remote_code, attn=attn)
        ref = dist.shard(ref, world, device).eval().requires_grad_(False)
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
    opt = adamw(model, args, device)
    sched = get_constant_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps * args.num_iterations))
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def evaluate():  # without an eval set: {}, and the metrics line has no eval keys
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)} if args.eval_data else {}

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="grpo")
    t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
    for step in bar:
        # Rollout: G samples of every prompt of this process's micro-batches, rewarded by the verifier
        epoch, k = divmod(step, steps_per_epoch)
        epoch_rng = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(prompts), generator=epoch_rng, device="cpu")
        idx = order[k * P:(k + 1) * P]
        batches = []
        for g in [i * world + rank for i in range(args.grad_accum)]:  # this process's micro-batches of the step
            recs = [prompts[j] for j in idx[g * args.batch_size:(g + 1) * args.batch_size].tolist()]
            policy = bf16_sampler(model, sampler) if sampler is not None else model
            batches.append(rollout(policy, ref, recs, args.seed * 10**9 + step * 10**4 + g, prompts, fns, tok,
                                   gen_cfg, args, share, static_len, device))
            timing["generate"] += batches[-1]["generate_s"]

        # Rollout statistics: named sums over this step's micro-batches, reduced over processes at the log line.
        sums = dist.Sums(device)
        for b in batches:
            r_BG = b["rewards"].view(-1, args.group_size)
            comps = [row[:int(n)] for row, n in zip(b["comp"].tolist(), b["mask"].sum(-1).tolist())]
            groups = [comps[j:j + args.group_size] for j in range(0, len(comps), args.group_size)]
            sums.add({"reward": r_BG.sum(), "reward_sq": (r_BG ** 2).sum(), "samples": r_BG.numel(),
                      "zero_std_groups": b["flat_first"], "groups": len(r_BG), "extra_groups": b["extra_groups"],
                      "zero_std_kept": (~spread(r_BG)).sum(), "score": b["score"].sum(),
                      "completion_tokens": b["mask"].sum(),
                      "distinct2": sum(distinct2(c) for c in groups)})
            if args.reward_fn:  # each reward function apart, before weighting
                sums.add({f"reward/{name}": v.sum() for name, v in b["parts"].items()})
            tokens += b["n_tokens"]
        batch_std = None  # --scale_rewards batch: the std of every score of the step, over all processes
        if args.scale_rewards == "batch":
            total = dist.all_sum(torch.stack([sum(b["score"].sum() for b in batches),
                                              sum((b["score"] ** 2).sum() for b in batches)]))
            n = dist.all_sum(sum(b["score"].numel() for b in batches)).item()
            batch_std = ((total[1] - total[0] ** 2 / n) / max(n - 1, 1)).clamp(min=0).sqrt()
        if args.loss_agg == "token":  # N: the global count of completion tokens ...
            n_local = sum(b["mask"].sum() for b in batches)
        else:  # ... or of completions with a loss token
            n_local = sum((b["mask"].sum(-1) > 0).sum() for b in batches)
        n_global = dist.all_sum(n_local).item()

        # Update: num_iterations optimizer steps on this batch, each over all its micro-batches.
        model.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        loss_sum = 0.0
        for it in range(args.num_iterations):
            for i, b in enumerate(batches):
                if world > 1:
                    model.set_requires_gradient_sync(i == len(batches) - 1)
                # log πθ(o_t | q, o_<t) = log softmax(logits_t / T)[o_t], and the entropy, for every completion token
                logps, ents = completion_logps(model, b["rows"], b["C"], args.temperature, device)
                if it == 0:  # on-policy pass: the sampling policy's log-probs; rewards -> advantages, group by group
                    b["old_logps"] = logps.detach()
                    # the sampler against this forward: k3 of KL(π_sampler ‖ π_train), and the TIS weight
                    mismatch_BC = kl_estimate(b["sampler_logps"], b["old_logps"], "k3")
                    if args.tis_cap:
                        b["tis"] = torch.exp(b["old_logps"] - b["sampler_logps"]).clamp(max=args.tis_cap)
                    sums.add({"mismatch_k3": (mismatch_BC * b["mask"]).sum()})
                    score_B = b["score"].clone()
                    if ref is not None:
                        kl_BC = kl_estimate(b["old_logps"], b["ref_logps"], args.kl_estimator)
                        if args.kl_placement == "reward":  # r_i - β Σ_t k_i,t: the penalty becomes part of the return
                            score_B = score_B - args.beta * (kl_BC * b["mask"]).sum(-1)
                        k3_BC = kl_estimate(b["old_logps"], b["ref_logps"], "k3")
                        sums.add({"kl": (k3_BC * b["mask"]).sum()})
                    b["adv"] = grpo_advantages(score_B.view(-1, args.group_size), args.scale_rewards,
                                               batch_std).view(-1)
                    sums.add({"entropy": (ents * b["mask"]).sum()})
                ratio = importance_ratio(logps, b["old_logps"], b["mask"], args.importance_sampling_level)
                if args.loss_type == "clip":
                    loss_BT, clipped_BT = clipped_surrogate(ratio, b["adv"], args.clip_eps, args.clip_eps_high)
                else:
                    loss_BT, clipped_BT = cispo_loss(ratio, logps, b["adv"], args.clip_eps_high or args.clip_eps)
                if args.tis_cap:  # min(π_train/π_sampler, C) on the policy-gradient term, not on the KL penalty
                    loss_BT = loss_BT * b["tis"]
                if ref is not None and args.kl_placement == "loss":
                    loss_BT = loss_BT + args.beta * kl_estimate(logps, b["ref_logps"], args.kl_estimator)
                loss = aggregate(loss_BT, b["mask"], args.loss_agg, n_global)
                (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
                loss_sum += loss.item() / args.num_iterations
                approx_kl_BC = kl_estimate(b["old_logps"], logps.detach(), "k3")  # k3 of KL(π_old ‖ πθ)
                sums.add({"clipped": (clipped_BT * b["mask"]).sum(), "approx_kl": (approx_kl_BC * b["mask"]).sum()})
            if not math.isfinite(dist.all_sum(loss_sum).item()):
                data.fail(f"non-finite loss at step {step + 1}; stopping without saving a model")
            gnorm = dist.clip_grads(model, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        loss_step = dist.all_sum(loss_sum).item()
        timing["steps"] += 1
        model.eval()  # rollouts and evaluation generate with the KV cache, which train mode would drop

        # Log: this step's rollout and update, over the global batch; evaluate; checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            s = sums.reduce()
            seconds = time.time() - t_log
            tps = dist.all_sum(tokens).item() / seconds
            n_resp = max(s["completion_tokens"], 1)  # completion tokens of the rollout
            n_upd = n_resp * args.num_iterations  # completion tokens seen by the update passes
            mean = s["reward"] / s["samples"]
            std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
            extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == total_steps else {}
            kl = {"kl": s["kl"] / n_resp} if ref is not None else {}
            shaped = {"reward/overlong": (s["score"] - s["reward"]) / s["samples"]} if args.overlong_buffer else {}
            dynamic = {"extra_groups": s["extra_groups"], "frac_zero_std_kept": s["zero_std_kept"] / s["groups"]}
            parts = {f"reward/{f.name}": s[f"reward/{f.name}"] / s["samples"] for f in fns} if args.reward_fn else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                        frac_zero_std=s["zero_std_groups"] / s["groups"], **kl, entropy=s["entropy"] / n_resp,
                        mismatch_k3=s["mismatch_k3"] / n_resp, **shaped, **(dynamic if args.dynamic_sampling else {}),
                        **parts,
                        clip_frac=s["clipped"] / n_upd, approx_kl=s["approx_kl"] / n_upd,
                        response_length=s["completion_tokens"] / s["samples"], distinct2=s["distinct2"] / s["groups"],
                        step_s=seconds / timing["steps"], generate_s=timing["generate"] / timing["steps"], **extra)
            t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            dist.save_checkpoint(ckpt, model, opt, sched, done, rank)

    # Save
    dist.save_model(model, tok, args.output_dir, rank, merge_lora=args.merge_lora)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
