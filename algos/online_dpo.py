"""Online DPO: DPO on fresh pairs the policy samples itself every step, labelled by a reward (online feedback).

Offline DPO learns from pairs another policy wrote, and drifts away from them as it trains. Online DPO samples two
completions y1, y2 ~ πθ(·|x) of every prompt of the batch, scores both with the reward r (the verifier, or a reward
model), keeps the pairs whose rewards differ, calls the better sample yw and the other yl, and takes one DPO step
on those pairs against the frozen reference πref (the starting model). Log-probs are the sums over the completion
tokens only; chosen and rejected go through the policy in one forward:

    L(θ) = -(1/M) Σ_i log σ(β[(log πθ(yw|x) - log πref(yw|x)) - (log πθ(yl|x) - log πref(yl|x))]),
    {yw, yl} = {y1, y2} ~ πθ(·|x) ordered by r(x, y),   M = the global count of pairs with r(x, y1) ≠ r(x, y2)

Options as in dpo.py: --label_smoothing ε (conservative DPO) and --dpop_lambda λ (DPOP, arXiv:2402.13228).
The reference is held in memory, not precomputed as in dpo.py: the pairs are new every step.

Reference: Guo et al. 2024, arXiv:2402.04792 (OAIF); the DPO loss: Rafailov et al. 2023, arXiv:2305.18290.
Deviations from the paper:
  1. The preference comes from the reward of each sample (the verifier, or --reward_model), not from an LLM annotator
     asked which of the two is better. A tie (equal rewards, identical samples among them) says nothing and is
     dropped (make_pairs); a micro-batch without a pair adds exactly 0 to the loss, and a step whose global batch
     has no pair changes nothing (no optimizer or scheduler step).
  2. Dropout is off in the policy as in the reference: every dropout rate of the config is 0 before the
     model is built and every nn.Dropout gets p = 0, so the log-ratios, and the implicit rewards at
     step 0, are exact.
  3. Log-probs are of the untempered policy, whatever --temperature sampled: the DPO loss compares πθ with πref on
     any pair, wherever it came from. Sampling is seeded per micro-batch: samples do not depend on the process count.
Data: JSONL, {"prompt": ..., "answer": ...}; reward = common.toy.verify, or the weighted sum of --reward_fn functions
of the completion and its record (common/rewards.py), or --reward_model (with either, "answer" is optional).
Run:  python algos/online_dpo.py
      torchrun --nproc_per_node 8 algos/online_dpo.py --model runs/qwen-sft --data prompts.jsonl --reward_model runs/rm
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
from transformers import AutoModelForSequenceClassification, GenerationConfig, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import sequence_logps  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.rewards import load_rewards, reward  # noqa: E402
from common.sampling import bf16_sampler, generate  # noqa: E402
from common.template import IGNORE, encode_prompt  # noqa: E402


@dataclass
class Args:
    beta: float = 0.1  # β: strength of the KL regularisation toward πref (the implicit reward's scale)
    label_smoothing: float = 0.0  # ε of conservative DPO: the probability that a pair's label is flipped
    dpop_lambda: float = 0.0  # λ of DPOP: penalty on the chosen log-prob falling below the reference (0: off)
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # the frozen reference πref; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt","answer"} JSONL (generation accuracy); default: embedded, without --data
    reward_model: str = ""  # sequence-classification reward model (rm.py) scoring the samples; default: the verifier
    reward_fn: list[str] = field(default_factory=list)  # FILE.py:NAME[:WEIGHT], repeatable, instead of the verifier
    output_dir: str = "runs/online_dpo"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    batch_size: int = 64  # prompts per process per micro-batch (each sampled twice: at most one pair)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_new_tokens: int = 12  # completion length limit
    temperature: float = 1.0  # sampling temperature (the loss's log-probs are of the untempered policy)
    top_p: float = 1.0  # nucleus sampling
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 100  # optimizer steps, each on freshly sampled pairs; 0: run --epochs over the prompts
    epochs: int = 1  # passes over the prompts when max_steps is 0
    warmup_ratio: float = 0.1  # fraction of steps of linear warmup before the cosine decay
    seed: int = 0  # seed of the data order, the sampling and every RNG
    log_every: int = 5  # steps between metrics lines (each line reports its own step's samples and pairs)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 50  # steps between evaluations (0: only at the end)
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
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    loss_chunk: int = -1  # millions of vocabulary-wide logits held at once; 0: full logits; -1: 128 on GPU, 0 on CPU
    packing: bool = True  # with a varlen kernel (GPU): a micro-batch's sequences in one row, no padding


def dpo_loss(logps_c_M, logps_r_M, ref_c_M, ref_r_M, beta, n_pairs, label_smoothing=0.0, dpop_lambda=0.0,
             rpo_alpha=0.0, n_chosen_tokens=1):
    """Σ_i DPO loss of pair i / n_pairs (the global pair count), plus RPO's α·Σ_i -log πθ(yw_i|x_i) / N_w, N_w =
    n_chosen_tokens (the chosen responses' mean token NLL, global batch) -> (loss, implicit rewards of chosen, of
    rejected)."""
    ratio_c, ratio_r = logps_c_M - ref_c_M, logps_r_M - ref_r_M  # log πθ(y|x) - log πref(y|x)
    # DPOP: h gets - λ·max(0, log πref(yw|x) - log πθ(yw|x))
    h = ratio_c - ratio_r - dpop_lambda * (-ratio_c).clamp(min=0)
    # -(1-ε)·log σ(βh) - ε·log σ(-βh); logsigmoid stays finite for any margin
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    loss = losses.sum() / max(n_pairs, 1)
    if rpo_alpha:  # RPO: the chosen response's NLL keeps its log-prob from falling with the rejected one's
        loss = loss + rpo_alpha * -logps_c_M.sum() / max(n_chosen_tokens, 1)
    return loss, (beta * ratio_c).detach(), (beta * ratio_r).detach()


def make_pairs(rewards_a_B, rewards_b_B, identical_B=None):
    """Two samples a, b of each of B prompts -> (kept_M: the prompts whose samples' rewards differ, a_chosen_M: a has
    the higher reward there). A tie, identical samples among them (identical_B, for a reward model's rounding noise),
    carries no preference and is dropped."""
    differ_B = rewards_a_B != rewards_b_B
    if identical_B is not None:
        differ_B = differ_B & ~identical_B
    kept_M = differ_B.nonzero().squeeze(-1)
    return kept_M, rewards_a_B[kept_M] > rewards_b_B[kept_M]


def load_prompts(path, tok, args):
    """-> [{"ids", "answer", "record", "where"}]; prompts leaving fewer than max_new_tokens of max_len are dropped
    (and counted)."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        ids = encode_prompt(tok, prompt)
        need = not (args.reward_model or args.reward_fn)
        answer = data.field(rec, where, "answer", str) if need or "answer" in rec else None
        if len(ids) + args.max_new_tokens > args.max_len:
            n_long += 1
        else:
            recs.append({"ids": ids, "answer": answer, "record": rec, "where": where})
    return recs, n_long


@torch.no_grad()
def rollout(policy, rm, fns, recs, seed, tok, gen_cfg, static_len, device):
    """Two samples of each prompt and their rewards -> the pairs whose rewards differ, chosen the higher:
    [((chosen ids, labels), (rejected ids, labels))], labels on the completion tokens (up to EOS) only."""
    torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
    prompt_ids = [r["ids"] for r in recs for _ in range(2)]  # a prompt's samples a, b consecutive
    comp, mask, ended = generate(policy, prompt_ids[::2], 2, tok, gen_cfg, device, dist.rank_world()[1] > 1,
                                 static_len)
    comps = [row[:int(n)] for row, n in zip(comp.tolist(), mask.sum(-1).tolist())]
    seqs = [(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompt_ids, comps)]
    parts = {}
    if rm is None:  # the verifier (exact match of the final number), or the reward functions
        texts = tok.batch_decode(comp, skip_special_tokens=True)
        each = [r for r in recs for _ in range(2)]
        rewards, parts = reward(fns, texts, [r["record"] for r in each], [r["where"] for r in each], device)
    else:  # the reward model reads the end-of-turn token; a truncated sample gets one, as rm.py trained on
        ids = [s + [tok.eos_token_id] * (not e) for (s, _), e in zip(seqs, ended.tolist())]
        width = max(map(len, ids))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids], device=device)
        with dist.autocast(device):  # the head pools the last non-pad position itself
            rewards = rm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0].float()
    identical = torch.tensor([a == b for a, b in zip(comps[::2], comps[1::2])], device=device)
    kept, a_chosen = make_pairs(rewards[::2], rewards[1::2], identical)
    pairs = [(seqs[2 * i], seqs[2 * i + 1]) if a else (seqs[2 * i + 1], seqs[2 * i])
             for i, a in zip(kept.tolist(), a_chosen.tolist())]
    n_tokens = sum(map(len, prompt_ids)) + mask.sum().item()
    return dict(pairs=pairs, tie=[(seqs[0], seqs[1])], rewards=rewards, parts=parts, comp_tokens=mask.sum(),
                n_tokens=n_tokens)


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

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    if args.reward_fn and args.reward_model:
        data.fail("--reward_fn and --reward_model both score the samples: give one")
    fns = load_rewards(args.reward_fn)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    rm_tok = load_tokenizer(args.reward_model, args.trust_remote_code) if args.reward_model else tok
    if rm_tok.get_vocab() != tok.get_vocab():
        data.fail(f"reward model {args.reward_model!r} has another tokenizer than {args.model!r}; "
                  "it must read the sampled ids")
    prompts, n_long = load_prompts(args.data, tok, args)
    eval_recs = []  # held-out {"prompt", "answer"}: generation accuracy
    if args.eval_data:
        eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                     for w, r in data.read_jsonl(args.eval_data)]
    if not prompts:
        data.fail(f"{args.data}: no prompt leaves max_new_tokens={args.max_new_tokens} of max_len={args.max_len}")
    say(f"{len(prompts)} prompts; {n_long} longer than max_len={args.max_len} - max_new_tokens were dropped")
    if not args.reward_model:
        reward(fns, [""], [prompts[0]["record"]], [prompts[0]["where"]], device)  # a function that fails, fails now
    G = args.batch_size * args.grad_accum * world  # prompts per optimizer step (each gives at most one pair)
    if len(prompts) < G:
        data.fail(f"{args.data}: {len(prompts)} prompts, fewer than one global batch of {G}")
    steps_per_epoch = len(prompts) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    n_epochs = -(-total_steps // steps_per_epoch)
    orders = [torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + e), device="cpu")
              for e in range(n_epochs)]
    plan = []  # the global batch of every step: prompt indices, a CPU tensor each
    for s in range(total_steps):
        first = s % steps_per_epoch * G
        plan.append(orders[s // steps_per_epoch][first:first + G])
    # One packed row pays where attention runs per document (varlen); sdpa (CPU) would mask a dense square: padding
    packed = args.packing and dist.attn_impl(device) != "sdpa"
    fwd_opts = dict(pad_id=tok.pad_token_id, packed=packed, budget=dist.logits_budget(args.loss_chunk, device),
                    device=device)

    # Models: the reference and the reward model, frozen and held for the whole run (the pairs are sampled as it
    # goes); the policy samples the pairs and learns from them. Dropout is off in all three (deviation 2).
    ref = None
    if not (args.lora_r and args.ref_model == args.model):  # with LoRA: the policy with its adapters off (below)
        ref = load_model(args.ref_model, tok, device, args.trust_remote_code)
        ref = dist.shard(ref, world, device).eval().requires_grad_(False)
    rm = None
    if args.reward_model:
        rm = load_model(args.reward_model, tok, device, args.trust_remote_code, cls=AutoModelForSequenceClassification)
        rm = dist.shard(rm, world, device).eval()
    if rm is not None and (rm.config.pad_token_id != tok.pad_token_id or tok.pad_token_id == tok.eos_token_id):
        data.fail(f"reward model {args.reward_model!r} needs the tokenizer's pad token {tok.pad_token!r}, "
                  "and one other than EOS (it reads the last non-pad token)")
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code), args)
    model = dist.shard(model, world, device).eval()
    if ref is None:
        ref = lora.adapters_off(model)  # the starting model: the policy with its adapters disabled, no second copy
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def evaluate():
        """Generation accuracy on eval_data; {} without it."""
        out = {}
        if eval_recs:
            out["eval/accuracy"] = toy.evaluate(model, tok, eval_recs)
        return out

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="online_dpo")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, idx = step // steps_per_epoch, plan[step]
        firsts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this rank's micro-batches
        micro = [idx[first:first + args.batch_size] for first in firsts]

        # Rollout: two samples of every prompt by the policy as it is now, scored; ties dropped (deviation 1).
        stats = dist.Sums(device)  # this step's samples, summed
        batches = []
        for first, m in zip(firsts, micro):
            policy = bf16_sampler(model, sampler) if sampler is not None else model
            b = rollout(policy, rm, fns, [prompts[j] for j in m.tolist()], args.seed * 10**9 + step * 10**4 + first,
                        tok, gen_cfg, static_len, device)
            stats.add({"reward": b["rewards"].sum(), "samples": len(b["rewards"]), "kept": len(b["pairs"]),
                       "completion_tokens": b["comp_tokens"],
                       **{f"reward/{name}": v.sum() for name, v in b["parts"].items()}})
            tokens += b["n_tokens"]
            batches.append(b)
        n_pairs = int(dist.all_sum(sum(len(b["pairs"]) for b in batches)).item())  # M of the equation

        # Update: the DPO loss on the fresh pairs; a step without any pair skips it (deviation 1).
        loss_sum, sums = 0.0, dist.Sums(device)  # this step's metrics, summed over pairs
        gnorm = torch.zeros((), device=device)  # logged as 0 where no pair trains
        model.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        for i, b in enumerate(batches if n_pairs else []):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            batch = b["pairs"] or b["tie"]  # no pair here: one tie is forwarded, then sliced away (FSDP gathers)
            seqs = [c for c, _ in batch] + [r for _, r in batch]  # chosen and rejected in one forward
            # log π(y|x) = Σ_t log softmax(logits_t)[y_t] over each completion's tokens, of the policy and πref
            logps, lens = sequence_logps(model, seqs, **fwd_opts)
            with torch.no_grad():
                ref_logps = sequence_logps(ref, seqs, **fwd_opts)[0]
            M = len(b["pairs"])  # 0 for the tie: every term below is an empty sum, exactly 0
            (logps_c, logps_r), (ref_c, ref_r), (lens_c, lens_r) = ([x[:M] for x in t.chunk(2)]
                                                                    for t in (logps, ref_logps, lens))
            loss, rewards_c, rewards_r = dpo_loss(logps_c, logps_r, ref_c, ref_r, args.beta, n_pairs,
                                                  args.label_smoothing, args.dpop_lambda)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.item()
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            sums.add({"logps/chosen": logps_c.detach().sum(), "logps/rejected": logps_r.detach().sum(),
                      "logps/ref_chosen": ref_c.sum(), "logps/ref_rejected": ref_r.sum(),
                      "rewards/chosen": rewards_c.sum(), "rewards/rejected": rewards_r.sum(),
                      "rewards/accuracy": right.sum(), "pairs": M})
            # k1 of KL(πθ ‖ πref) per token, on the kept pairs' samples (at temperature 1 they are samples of πθ)
            stats.add({"kl": (logps_c + logps_r - ref_c - ref_r).detach().sum(), "kl_tokens": (lens_c + lens_r).sum()})
        model.eval()  # rollouts and evaluation generate with the KV cache, which train mode would drop
        loss_step = dist.all_sum(loss_sum).item()
        if not math.isfinite(loss_step):
            data.fail(f"non-finite loss {loss_step} at step {step + 1}; stopping without saving a model")
        if n_pairs:  # without a pair AdamW's momentum would still move the weights: no step at all
            gnorm = dist.clip_grads(model, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        # Log: this step's samples and pairs, over the global batch; evaluate; checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            tps = dist.all_sum(tokens).item() / (time.time() - t_log)
            s, r = sums.reduce(), stats.reduce()
            per_pair = {k: v / s["pairs"] for k, v in s.items() if k != "pairs"} if n_pairs else {}
            if per_pair:  # means over the step's pairs
                per_pair["rewards/margin"] = per_pair["rewards/chosen"] - per_pair["rewards/rejected"]
                per_pair["kl"] = r["kl"] / r["kl_tokens"]
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            rollout_means = {"reward/mean": r["reward"] / r["samples"], "frac_kept": r["kept"] / (r["samples"] / 2),
                             "response_length": r["completion_tokens"] / r["samples"]}  # over every sample
            if args.reward_fn:  # each reward function apart, before weighting
                rollout_means.update({f"reward/{f.name}": r[f"reward/{f.name}"] / r["samples"] for f in fns})
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **per_pair, **rollout_means, **extra)
            t_log, tokens = time.time(), 0.0
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
