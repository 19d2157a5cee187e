"""Direct Preference Optimization (DPO): the policy is its own reward model, trained on preference pairs.

DPO fits the Bradley-Terry model with the implicit reward r(x, y) = β·log(πθ(y|x) / πref(y|x)), which
is the reward whose KL-regularised optimum is πθ; no reward model and no sampling. Log-probs are the
sums over the response tokens only; chosen and rejected go through the policy in one forward:

    L(θ) = -(1/M) Σ_i log σ(β[(log πθ(yw|x) - log πref(yw|x)) - (log πθ(yl|x) - log πref(yl|x))])

Options: --label_smoothing ε (conservative DPO: -(1-ε)·log σ(βh) - ε·log σ(-βh), for noisy labels) and
--dpop_lambda λ (DPOP, arXiv:2402.13228: λ·max(0, log πref(yw|x) - log πθ(yw|x)) is subtracted inside the
β-scaled argument, so the chosen log-prob is not pushed below the reference) and --rpo_alpha α (RPO,
arXiv:2404.19733: L + α·(1/N_w) Σ_i -log πθ(yw_i|x_i), N_w the chosen tokens of the global batch, as TRL's "sft"
loss term beside "sigmoid"; another remedy for a falling chosen log-prob). logps/chosen against
logps/ref_chosen shows the likelihood displacement of arXiv:2410.08847 (both log-probs falling).

Reference: Rafailov et al. 2023, arXiv:2305.18290.
Deviations from the paper:
  1. The reference log-probs of every pair are computed once, before training, in one no-grad pass,
     and the reference model is freed: it is frozen, so this is the same loss with one model in memory.
  2. Dropout is off in the policy as in the reference: every dropout rate of the config is 0 before the
     model is built and every nn.Dropout gets p = 0, so the log-ratios, and the implicit rewards at
     step 0, are exact.
  3. eval/pref_accuracy counts a tie of the implicit rewards as half right, so a policy equal to its
     reference (all rewards 0) starts at 0.5, the accuracy of a coin.
Data: JSONL, {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists).
Run:  python algos/dpo.py
      torchrun --nproc_per_node 8 algos/dpo.py --model runs/qwen-sft --data pairs.jsonl --max_len 1024
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import all_logps, sequence_logps  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.template import IGNORE, encode_response  # noqa: E402


@dataclass
class Args:
    beta: float = 0.1  # β: strength of the KL regularisation toward πref (the implicit reward's scale)
    label_smoothing: float = 0.0  # ε of conservative DPO: the probability that a pair's label is flipped
    dpop_lambda: float = 0.0  # λ of DPOP: penalty on the chosen log-prob falling below the reference (0: off)
    rpo_alpha: float = 0.0  # α of RPO: weight of the chosen responses' mean token NLL added to the loss (0: off)
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # the frozen reference πref; default: --model
    data: str = ""  # JSONL of preference pairs; default: the embedded pairs
    eval_data: str = ""  # held-out {"prompt","answer"} JSONL (generation accuracy); default: embedded, without --data
    eval_pairs: str = ""  # held-out pairs JSONL (preference accuracy); default: the embedded ones, without --data
    output_dir: str = "runs/dpo"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # pairs with a side longer than this are dropped (and counted)
    batch_size: int = 32  # pairs per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 50  # optimizer steps; 0: run --epochs over the data
    epochs: int = 1  # passes over the data when max_steps is 0
    warmup_ratio: float = 0.1  # fraction of steps of linear warmup before the cosine decay
    seed: int = 0  # seed of the data order and of every RNG
    log_every: int = 5  # steps between metrics lines
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 25  # steps between evaluations (0: only at the end)
    save_every: int = 25  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    # LoRA (peft, arXiv:2106.09685): low-rank adapters train, the model's own weights stay frozen
    lora_r: int = 0  # rank of the adapters; 0: full fine-tuning, every parameter trains
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: str = "all-linear"  # comma-separated module names; all-linear: every linear layer but the head
    merge_lora: bool = False  # also save the merged model (base + adapters folded in) in output_dir/merged
    # Speed and memory: none of these changes the loss
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    compile: Literal["auto", "true", "false"] = "auto"  # torch.compile each decoder layer; auto: on CUDA
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


def load_pairs(path, tok, args):
    """-> [((chosen ids, labels), (rejected ids, labels))], labels on the response tokens only."""
    pairs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt, chosen, rejected = data.preference(rec, where)
        sides = tuple(encode_response(tok, prompt, resp) for resp in (chosen, rejected))
        if max(len(ids) for ids, _ in sides) > args.max_len:
            n_long += 1
        else:
            pairs.append(sides)
    return pairs, n_long


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    compiled = data.resolve(args.compile, auto=device.type == "cuda")  # eager on CPU, where tests were calibrated
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("prefs.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.eval_pairs = args.eval_pairs or (toy.data("prefs_eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    tok = load_tokenizer(args.model, args.trust_remote_code)
    pairs, n_long = load_pairs(args.data, tok, args)
    eval_pairs = load_pairs(args.eval_pairs, tok, args)[0] if args.eval_pairs else []
    eval_recs = []  # held-out {"prompt", "answer"}: generation accuracy
    if args.eval_data:
        eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                     for w, r in data.read_jsonl(args.eval_data)]
    if not pairs:
        data.fail(f"{args.data}: no pair fits max_len={args.max_len}")
    if args.eval_pairs and not eval_pairs:
        data.fail(f"{args.eval_pairs}: no pair fits max_len={args.max_len}")
    say(f"{len(pairs)} pairs; {n_long} with a side longer than max_len={args.max_len} were dropped")
    G = args.batch_size * args.grad_accum * world  # pairs per optimizer step
    if len(pairs) < G:
        data.fail(f"{args.data}: {len(pairs)} pairs, fewer than one global batch of {G}")
    n_chosen = torch.tensor([sum(l != IGNORE for l in labels[1:]) for (_, labels), _ in pairs], device="cpu")  # |yw|
    steps_per_epoch = len(pairs) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    n_epochs = -(-total_steps // steps_per_epoch)
    orders = [torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + e), device="cpu")
              for e in range(n_epochs)]
    plan = []  # the global batch of every step: pair indices, a CPU tensor each
    for s in range(total_steps):
        first = s % steps_per_epoch * G
        plan.append(orders[s // steps_per_epoch][first:first + G])
    # One packed row pays where attention runs per document (varlen); sdpa (CPU) would mask a dense square: padding
    packed = args.packing and dist.attn_impl(device) != "sdpa"
    fwd_opts = dict(pad_id=tok.pad_token_id, packed=packed, budget=dist.logits_budget(args.loss_chunk, device),
                    device=device)

    # Reference: log πref of every pair the run will see, and of the held-out pairs, in one pass; then freed.
    ref = dist.shard(load_model(args.ref_model, tok, device, args.trust_remote_code), world, device).eval()
    used = torch.cat(plan).unique()
    ref_used, _ = all_logps(ref, [pairs[j] for j in used.tolist()], args.batch_size, **fwd_opts)
    ref_logps = torch.zeros(2, len(pairs), device="cpu")  # chosen, rejected; on the CPU: a step copies its pairs'
    ref_logps[:, used] = ref_used.cpu()
    eval_ref, _ = all_logps(ref, eval_pairs, args.batch_size, **fwd_opts)
    del ref

    # Policy (train mode only matters to --gradient_checkpointing: dropout is 0), optimizer, schedule
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code), args)
    model = dist.shard(model, world, device).train()
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    if compiled:
        dist.compile_layers(model)
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def evaluate():
        """Generation accuracy on eval_data, preference accuracy and margin on eval_pairs; {} without either."""
        out = {}
        if eval_recs:
            out["eval/accuracy"] = toy.evaluate(model, tok, eval_recs)
        if eval_pairs:
            logps, _ = all_logps(model, eval_pairs, args.batch_size, **fwd_opts)
            _, rewards_c, rewards_r = dpo_loss(*logps, *eval_ref, args.beta, 1)
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            out["eval/pref_accuracy"] = right.mean().item()
            out["eval/margin"] = (rewards_c - rewards_r).mean().item()
        return out

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="dpo")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, idx = step // steps_per_epoch, plan[step]
        firsts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this rank's micro-batches
        micro = [idx[first:first + args.batch_size] for first in firsts]
        n_pairs = G  # M of the equation: every pair of the global batch counts once
        n_chosen_tokens = n_chosen[idx].sum().item()  # RPO's N_w: chosen tokens of the global batch
        loss_sum, sums = torch.zeros((), device=device), dist.Sums(device)  # this step's metrics, summed over pairs
        for i, m in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            batch = [pairs[j] for j in m.tolist()]
            seqs = [c for c, _ in batch] + [r for _, r in batch]  # chosen and rejected in one forward
            # log πθ(y|x) = Σ_t log softmax(logits_t)[y_t] over each response's tokens
            logps, lens = sequence_logps(model, seqs, **fwd_opts)
            logps_c, logps_r = logps.chunk(2)
            ref_c, ref_r = dist.to_device(ref_logps[:, m], device)
            loss, rewards_c, rewards_r = dpo_loss(logps_c, logps_r, ref_c, ref_r, args.beta, n_pairs,
                                                  args.label_smoothing, args.dpop_lambda, args.rpo_alpha,
                                                  n_chosen_tokens)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()  # kept on the device: the host reads it when the step logs or saves
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            sums.add({"logps/chosen": logps_c.detach().sum(), "logps/rejected": logps_r.detach().sum(),
                      "logps/ref_chosen": ref_c.sum(), "logps/ref_rejected": ref_r.sum(),
                      "rewards/chosen": rewards_c.sum(), "rewards/rejected": rewards_r.sum(),
                      "rewards/accuracy": right.sum(), "pairs": len(m)})
            tokens += sum(len(ids) for ids, _ in seqs)
        gnorm = dist.clip_grads(model, args.max_grad_norm)  # a tensor on the device: no host sync
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # Log, evaluate, checkpoint
        done = step + 1
        log_now = done % args.log_every == 0 or done == total_steps
        if log_now or (args.save_every and done % args.save_every == 0):
            loss_step = dist.all_sum(loss_sum).item()  # the first host sync of the step
            if not math.isfinite(loss_step):
                data.fail(f"non-finite loss {loss_step} at step {done}; stopping without saving a model")
        if log_now:
            tps = dist.all_sum(tokens).item() / (time.time() - t_log)
            s = sums.reduce()
            per_pair = {k: v / s["pairs"] for k, v in s.items() if k != "pairs"}  # means over the step's pairs
            per_pair["rewards/margin"] = per_pair["rewards/chosen"] - per_pair["rewards/rejected"]
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **per_pair, **extra)
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
