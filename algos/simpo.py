"""Simple Preference Optimization (SimPO): a reference-free margin between length-normalised log-probs.

SimPO's implicit reward is the policy's own mean token log-prob of the response, scaled:
r(x, y) = β/|y|·log πθ(y|x), the quantity that generation ranks by, so no reference model is needed,
and a target margin γ > 0 asks the chosen response to win by more than a tie. Log-probs are over the
response tokens only; chosen and rejected go through the policy in one forward:

    L(θ) = -(1/M) Σ_i log σ(β/|yw|·log πθ(yw|x) - β/|yl|·log πθ(yl|x) - γ)

Reference: Meng et al. 2024, arXiv:2405.14734.
Deviations from the paper:
  1. --gamma is the equation's γ itself; the paper's tables quote the ratio γ/β.
  2. Dropout is off: every dropout rate of the config is 0 before the model is built, and every
     nn.Dropout gets p = 0.
  3. eval/pref_accuracy counts a tie of the rewards as half right, as in the other preference scripts.
Data: JSONL, {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists).
Run:  python algos/simpo.py
      torchrun --nproc_per_node 8 algos/simpo.py --model runs/qwen-sft --data pairs.jsonl --max_len 1024
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
from common.template import encode_response  # noqa: E402


@dataclass
class Args:
    beta: float = 2.0  # β: scale of the reward β/|y|·log πθ(y|x)
    gamma: float = 0.5  # γ: the target reward margin of chosen over rejected
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    data: str = ""  # JSONL of preference pairs; default: the embedded pairs
    eval_data: str = ""  # held-out {"prompt","answer"} JSONL (generation accuracy); default: embedded, without --data
    eval_pairs: str = ""  # held-out pairs JSONL (preference accuracy); default: the embedded ones, without --data
    output_dir: str = "runs/simpo"  # model, args.json, metrics.jsonl, checkpoint/
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


def simpo_loss(logps_c_M, logps_r_M, len_c_M, len_r_M, beta, gamma, n_pairs):
    """Σ_i SimPO loss of pair i / n_pairs (the global pair count) -> (loss, rewards of chosen, of rejected)."""
    rewards_c, rewards_r = beta * logps_c_M / len_c_M, beta * logps_r_M / len_r_M  # β/|y|·log πθ(y|x)
    h = rewards_c - rewards_r - gamma
    losses = -F.logsigmoid(h)  # logsigmoid stays finite for any margin
    return losses.sum() / max(n_pairs, 1), rewards_c.detach(), rewards_r.detach()


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
            logps, lens = all_logps(model, eval_pairs, args.batch_size, **fwd_opts)
            _, rewards_c, rewards_r = simpo_loss(*logps, *lens, args.beta, args.gamma, 1)
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            out["eval/pref_accuracy"] = right.mean().item()
            out["eval/margin"] = (rewards_c - rewards_r).mean().item()
        return out

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="simpo")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, idx = step // steps_per_epoch, plan[step]
        firsts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this rank's micro-batches
        micro = [idx[first:first + args.batch_size] for first in firsts]
        n_pairs = G  # M of the equation: every pair of the global batch counts once
        loss_sum, sums = torch.zeros((), device=device), dist.Sums(device)  # this step's metrics, summed over pairs
        for i, m in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            batch = [pairs[j] for j in m.tolist()]
            seqs = [c for c, _ in batch] + [r for _, r in batch]  # chosen and rejected in one forward
            # log πθ(y|x) = Σ_t log softmax(logits_t)[y_t] over each response's tokens
            logps, lens = sequence_logps(model, seqs, **fwd_opts)
            logps_c, logps_r = logps.chunk(2)
            len_c, len_r = lens.chunk(2)
            loss, rewards_c, rewards_r = simpo_loss(logps_c, logps_r, len_c, len_r, args.beta, args.gamma, n_pairs)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()  # kept on the device: the host reads it when the step logs or saves
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            sums.add({"logps/chosen": logps_c.detach().sum(), "logps/rejected": logps_r.detach().sum(),
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
