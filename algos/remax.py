"""ReMax: REINFORCE with the reward of the greedy completion as baseline, no clip and no critic.

Each prompt x gets sampled completions y_i and one greedy completion ŷ (argmax decoding). Samples are
scored by a verifier (exact match of the final answer) minus the KL penalty of the whole completion,
R_i = r_i - β Σ_t k_i,t; the baseline is the verifier reward of the greedy completion, r(x, ŷ), which does
not depend on y_i (the gradient stays unbiased) and needs no value model:

    ∇J(θ) = (1/N) Σ_i (R_i - r(x_i, ŷ_i)) Σ_t ∇θ log πθ(y_i,t | x_i, y_i,<t),   N = Σ_i |y_i|

Reference: Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
Large Language Models", arXiv:2310.10505.
Deviations from the paper:
  1. --group_size samples per prompt share its one greedy baseline (the paper: one sample per prompt,
     --group_size 1), so every method of the family sees the same number of samples per step.
  2. The sum over samples is divided by the global completion-token count N (the paper: by the number of
     samples); the gradient direction is the same, and the step no longer grows with completion length.
     --loss_agg sequence averages log-probs over each completion's tokens instead of summing them.
  3. The KL penalty uses the per-token estimator --kl_estimator (k1 by default, the log-ratio), summed over
     the completion and subtracted from the sample's reward only; it is computed from the sampling-time log-probs.
  4. Log-probs are of the tempered policy softmax(logits / T) that sampled (as in TRL), top-p aside.
  5. Sampling is seeded per micro-batch: samples (and the loss) do not depend on the process count.
Data: JSONL, {"prompt": ..., "answer": ...} (prompt: a string or a message list); reward = common.toy.verify, or
the weighted sum of --reward_fn functions of the completion and its record (common/rewards.py; "answer" optional).
Run:  python algos/remax.py
      torchrun --nproc_per_node 8 algos/remax.py --model runs/sft --data prompts.jsonl --max_new_tokens 256
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
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
    group_size: int = 8  # sampled completions per prompt (plus one greedy completion, the baseline)
    beta: float = 0.04  # KL coefficient β (0: no reference model is loaded)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # per-token KL(πθ ‖ π_ref) estimator, summed into the penalty
    loss_agg: Literal["token", "sequence"] = "token"  # token: Σ ℓ / global token count | sequence: mean of seq means
    mask_truncated: bool = False  # completions that hit max_new_tokens without EOS carry no loss (DAPO)
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # frozen reference policy of the KL penalty; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    reward_fn: list[str] = field(default_factory=list)  # FILE.py:NAME[:WEIGHT], repeatable; default: the verifier
    output_dir: str = "runs/remax"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    batch_size: int = 16  # prompts per process per micro-batch (each sampled group_size times)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_new_tokens: int = 12  # completion length limit
    temperature: float = 1.0  # sampling temperature (log-probs are of the tempered policy)
    top_p: float = 1.0  # nucleus sampling
    lr: float = 2e-4  # learning rate (AdamW), constant after warmup
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 150  # sampled batches (one optimizer step each); 0: --epochs over the prompts
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


def remax_advantages(rewards_BG, greedy_rewards_B):
    """A_i = R_i - r(x, ŷ): every sample of a prompt (row) minus the reward of that prompt's greedy completion."""
    return rewards_BG - greedy_rewards_B[:, None]


def reinforce_loss(logps_BT, adv_B):
    """Per-token REINFORCE loss -A_i log πθ(y_i,t): its gradient is -A_i ∇θ log πθ,
    summed over tokens by aggregate()."""
    return -adv_B[:, None] * logps_BT


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
def rollout(policy, ref, recs, seed, fns, tok, gen_cfg, args, share, static_len, device):
    """G samples and a greedy ŷ per prompt, rewards, reference log-probs, without gradients. The sampling policy's own
    log-probs come from the first update pass (on-policy): no forward of their own."""
    torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
    prompt_ids = [r["ids"] for r in recs]
    t_gen = time.time()
    comp, mask, ended = generate(policy, prompt_ids, args.group_size, tok, gen_cfg, device, dist.rank_world()[1] > 1,
                                 static_len)
    texts = tok.batch_decode(comp, skip_special_tokens=True)  # on the host: the sampling has finished
    t_gen = time.time() - t_gen
    each = [r for r in recs for _ in range(args.group_size)]
    rewards, parts = reward(fns, texts, [r["record"] for r in each], [r["where"] for r in each], device)
    rows = group_rows(prompt_ids, comp, args.group_size, tok.pad_token_id, share)
    C = comp.shape[1]
    ref_logps = completion_logps(ref, rows, C, args.temperature, device)[0] if ref is not None else None
    if args.mask_truncated:
        mask = mask & ended[:, None]
    n_tokens = sum(map(len, prompt_ids)) * args.group_size + mask.sum().item()
    # ŷ: one greedy completion per prompt, the baseline
    greedy_cfg = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    greedy_comp, _, _ = generate(policy, prompt_ids, 1, tok, greedy_cfg, device, dist.rank_world()[1] > 1, static_len)
    greedy_texts = tok.batch_decode(greedy_comp, skip_special_tokens=True)
    greedy = reward(fns, greedy_texts, [r["record"] for r in recs], [r["where"] for r in recs], device)[0]
    return dict(rows=rows, comp=comp, C=C, mask=mask.float(), rewards=rewards, parts=parts, ref_logps=ref_logps,
                n_tokens=n_tokens, generate_s=t_gen, greedy=greedy)


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
    if args.group_size < 1:
        data.fail("--group_size must be at least 1")

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
    sched = get_constant_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps))
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def evaluate():  # without an eval set: {}, and the metrics line has no eval keys
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)} if args.eval_data else {}

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="remax")
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
            batches.append(rollout(policy, ref, recs, args.seed * 10**9 + step * 10**4 + g, fns, tok, gen_cfg,
                                   args, share, static_len, device))
            timing["generate"] += batches[-1]["generate_s"]

        # Rollout statistics: named sums over this step's micro-batches, reduced over processes at the log line.
        sums = dist.Sums(device)
        for b in batches:
            r_BG = b["rewards"].view(-1, args.group_size)
            comps = [row[:int(n)] for row, n in zip(b["comp"].tolist(), b["mask"].sum(-1).tolist())]
            groups = [comps[j:j + args.group_size] for j in range(0, len(comps), args.group_size)]
            sums.add({"reward": r_BG.sum(), "reward_sq": (r_BG ** 2).sum(), "samples": r_BG.numel(),
                      "zero_std_groups": (r_BG.amax(-1) == r_BG.amin(-1)).sum(), "groups": len(r_BG),
                      "completion_tokens": b["mask"].sum(), "distinct2": sum(distinct2(c) for c in groups)})
            if args.reward_fn:  # each reward function apart, before weighting
                sums.add({f"reward/{name}": v.sum() for name, v in b["parts"].items()})
            tokens += b["n_tokens"]
        if args.loss_agg == "token":  # N: the global count of completion tokens ...
            n_local = sum(b["mask"].sum() for b in batches)
        else:  # ... or of completions with a loss token
            n_local = sum((b["mask"].sum(-1) > 0).sum() for b in batches)
        n_global = dist.all_sum(n_local).item()

        # Update: one on-policy optimizer step over all micro-batches (REINFORCE needs samples of the current policy).
        model.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        loss_sum = 0.0
        for i, b in enumerate(batches):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            # log πθ(y_t | x, y_<t) = log softmax(logits_t / T)[y_t], and the entropy, for every completion token
            logps, ents = completion_logps(model, b["rows"], b["C"], args.temperature, device)
            # on-policy: these are the sampling policy's log-probs; rewards -> advantages, group by group
            b["old_logps"] = logps.detach()
            score_B = b["rewards"].clone()
            if ref is not None:
                kl_BC = kl_estimate(b["old_logps"], b["ref_logps"], args.kl_estimator)
                score_B = score_B - args.beta * (kl_BC * b["mask"]).sum(-1)  # R_i = r_i - β Σ_t k_i,t
                k3_BC = kl_estimate(b["old_logps"], b["ref_logps"], "k3")
                sums.add({"kl": (k3_BC * b["mask"]).sum()})
            b["adv"] = remax_advantages(score_B.view(-1, args.group_size), b["greedy"]).view(-1)
            sums.add({"entropy": (ents * b["mask"]).sum()})
            loss_BT = reinforce_loss(logps, b["adv"])
            loss = aggregate(loss_BT, b["mask"], args.loss_agg, n_global)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.item()
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
            mean = s["reward"] / s["samples"]
            std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
            extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == total_steps else {}
            kl = {"kl": s["kl"] / n_resp} if ref is not None else {}
            parts = {f"reward/{f.name}": s[f"reward/{f.name}"] / s["samples"] for f in fns} if args.reward_fn else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                        frac_zero_std=s["zero_std_groups"] / s["groups"], **kl, entropy=s["entropy"] / n_resp, **parts,
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
