"""Reward model (RM): a scalar head on the last token, trained on preference pairs (Bradley-Terry).

The SFT model gets a linear head that reads the hidden state of the last non-pad token (the
response's end-of-turn token) and outputs one score r(x, y). Under the Bradley-Terry model
P(y_w ≻ y_l | x) = σ(r(x, y_w) - r(x, y_l)), and the loss is its negative log-likelihood over the
global batch of M pairs; chosen and rejected go through the model in one forward:

    L(φ) = -(1/M) Σ_i log σ(r_φ(x_i, y_w,i) - r_φ(x_i, y_l,i))

Reference: InstructGPT, arXiv:2203.02155 (§3.5); Bradley & Terry 1952.
Data: JSONL, {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists).
Run:  python algos/rm.py
      torchrun --nproc_per_node 8 algos/rm.py --model runs/sft --data pairs.jsonl --max_len 1024
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.template import IGNORE, encode_response  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    data: str = ""  # JSONL of preference pairs; default: the embedded pairs
    eval_data: str = ""  # JSONL of held-out pairs; default: the embedded held-out pairs when --data is not given
    output_dir: str = "runs/rm"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # pairs with a side longer than this are dropped (and counted)
    batch_size: int = 32  # pairs per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW); 1e-3 collapsed the last token's representation on some seeds
    # Weight decay: without it the small model memorises the training pairs instead of learning to check the answer,
    # as in grokking (arXiv:2201.02177); docs/results.md has the held-out accuracy with and without it
    weight_decay: float = 0.5  # AdamW weight decay (decoupled)
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 3000  # optimizer steps (about 7 passes over the embedded pairs); 0: run --epochs over the data
    epochs: int = 1  # passes over the data when max_steps is 0
    warmup_ratio: float = 0.05  # fraction of steps of linear warmup before the cosine decay
    seed: int = 0  # seed of the data order and of every RNG
    log_every: int = 10  # steps between metrics lines
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    save_every: int = 100  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    # LoRA (peft, arXiv:2106.09685): low-rank adapters train, the model's own weights stay frozen
    lora_r: int = 0  # rank of the adapters; 0: full fine-tuning, every parameter trains
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: str = "all-linear"  # comma-separated module names; all-linear: every linear layer but the head
    merge_lora: bool = False  # also save the merged model (base + adapters folded in) in output_dir/merged
    # Speed and memory: none of these changes the loss
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute


def bt_loss(r_chosen_M, r_rejected_M, n_pairs):
    """Σ_i -log σ(r_w,i - r_l,i) / n_pairs, n_pairs the global pair count; logsigmoid is stable for any margin."""
    return -F.logsigmoid(r_chosen_M - r_rejected_M).sum() / max(n_pairs, 1)


def load_pairs(path, tok, args):
    """-> [(chosen ids, rejected ids)], each cut after its last response token (the end-of-turn token)."""
    pairs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt, chosen, rejected = data.preference(rec, where)
        sides = []
        for resp in (chosen, rejected):
            ids, labels = encode_response(tok, prompt, resp)
            sides.append(ids[:max(i for i, l in enumerate(labels) if l != IGNORE) + 1])
        if max(map(len, sides)) > args.max_len:
            n_long += 1
        elif tok.pad_token_id in (sides[0][-1], sides[1][-1]):
            data.fail(f"{where}: a response ends with the pad token {tok.pad_token!r}; "
                      "the head would read the wrong position")
        else:
            pairs.append(tuple(sides))
    return pairs, n_long


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("prefs.jsonl")
    args.eval_data = args.eval_data or (toy.data("prefs_eval.jsonl") if embedded else "")
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    tok = load_tokenizer(args.model, args.trust_remote_code)
    pairs, n_long = load_pairs(args.data, tok, args)
    eval_pairs = load_pairs(args.eval_data, tok, args)[0] if args.eval_data else []
    if not pairs:
        data.fail(f"{args.data}: no pair fits max_len={args.max_len}")
    if args.eval_data and not eval_pairs:
        data.fail(f"{args.eval_data}: no pair fits max_len={args.max_len}")
    say(f"{len(pairs)} pairs; {n_long} with a side longer than max_len={args.max_len} were dropped")
    G = args.batch_size * args.grad_accum * world  # pairs per optimizer step
    if len(pairs) < G:
        data.fail(f"{args.data}: {len(pairs)} pairs, fewer than one global batch of {G}")
    steps_per_epoch = len(pairs) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Model: the SFT backbone plus a freshly initialised scalar head ("score"), read at the last non-pad token;
    # dropout kept as its config sets it
    model = load_model(args.model, tok, device, args.trust_remote_code, cls=AutoModelForSequenceClassification,
                       dropout=True, num_labels=1, pad_token_id=tok.pad_token_id)
    model = lora.wrap(model, args)  # with LoRA the score head trains whole
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    model = dist.shard(model, world, device).train()
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def rewards(batch_pairs):
        """Chosen and rejected of every pair in one right-padded forward -> (r_chosen, r_rejected)."""
        seqs = [c for c, _ in batch_pairs] + [r for _, r in batch_pairs]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with dist.autocast(device):
            r = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
        return r[:len(batch_pairs)], r[len(batch_pairs):]

    def evaluate():
        """{} without an eval set; else the share of held-out pairs ranked right and their mean reward margin."""
        if not eval_pairs:
            return {}
        model.eval()
        sums = dist.Sums(device)
        sums.add({"correct": 0, "margin": 0.0, "pairs": 0})  # every process adds every name, even one without pairs
        per = -(-len(eval_pairs) // world)  # pairs per process
        mine = eval_pairs[rank * per:(rank + 1) * per]
        with torch.no_grad():
            for i in range(0, per, args.batch_size):  # the same number of forwards on every process (FSDP all-gathers)
                chunk = mine[i:i + args.batch_size]
                rc, rr = rewards(chunk or eval_pairs[:1])
                if chunk:  # a process out of pairs runs a stand-in batch and counts nothing
                    sums.add({"correct": (rc > rr).sum(), "margin": (rc - rr).sum(), "pairs": len(rc)})
        model.train()
        s = sums.reduce()
        return {"eval/accuracy": s["correct"] / s["pairs"], "eval/margin": s["margin"] / s["pairs"]}

    # Loop
    if start == 0 and eval_pairs:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="rm")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        gen = torch.Generator().manual_seed(args.seed + epoch)  # the data order: the same on every process
        order = torch.randperm(len(pairs), generator=gen, device="cpu")
        idx = order[k * G:(k + 1) * G]
        starts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this process's micro-batches
        micro = [idx[j:j + args.batch_size] for j in starts]
        n_pairs = G  # M of the equation: every pair of the global batch counts once
        loss_sum, sums = 0.0, dist.Sums(device)  # sums: this step's pairs, ranked right and margins
        for i, m in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            batch_pairs = [pairs[j] for j in m.tolist()]
            rc, rr = rewards(batch_pairs)
            loss = bt_loss(rc, rr, n_pairs)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.item()
            sums.add({"correct": (rc > rr).sum(), "margin": (rc - rr).sum(), "pairs": len(rc)})
            tokens += sum(len(c) + len(r) for c, r in batch_pairs)
        loss_step = dist.all_sum(loss_sum).item()
        if not math.isfinite(loss_step):
            data.fail(f"non-finite loss {loss_step} at step {step + 1}; stopping without saving a model")
        gnorm = dist.clip_grads(model, args.max_grad_norm)  # a tensor on the device: no host sync
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # Log, evaluate, checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            tps = dist.all_sum(tokens).item() / (time.time() - t_log)
            s = sums.reduce()
            ranked = {"rewards/accuracy": s["correct"] / s["pairs"], "rewards/margin": s["margin"] / s["pairs"]}
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **ranked, **extra)
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
