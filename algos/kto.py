"""Kahneman-Tversky Optimization (KTO): alignment from unpaired desirable and undesirable examples.

Each example is one completion labelled desirable or not; no pairs are needed. Its implicit reward
r = log πθ(y|x) - log πref(y|x) is compared with a reference point z_ref, an estimate of KL(πθ‖πref)
from mismatched (prompt, completion) pairs of the batch, detached and clamped at 0, through a
sigmoid value function: desirable examples gain by rising above z_ref, undesirable ones by falling
below it. Log-probs are sums over the response tokens only:

    L(θ) = (1/N) Σ_i [λ_yi - v(x_i, y_i)],
    v = λD·σ(β(r - z_ref)) if y_i is desirable, λU·σ(β(z_ref - r)) if not

Reference: Ethayarajh et al. 2024, arXiv:2402.01306.
Deviations from the paper:
  1. The mismatched pair of record k takes the completion of the next record of the global batch
     (cyclically) whose prompt differs, so no record is paired with itself for any batch size, odd ones
     included (a reversed-order pairing leaves the middle record of an odd batch matched with itself).
     z_ref is the mean over the whole global batch, so it does not depend on the process count.
  2. The reference log-probs of every record, and of every step's mismatched pairs (the batches are
     fixed by the seed), are computed once, before training, in one no-grad pass, and the reference
     model is freed. The policy's log-probs of the mismatched pairs take a no-grad forward: z_ref
     carries no gradient anyway.
  3. Dropout is off in the policy as in the reference: every dropout rate of the config is 0 before the
     model is built and every nn.Dropout gets p = 0, so the log-ratios are exact.
  4. eval/pref_accuracy ranks held-out pairs by β·r; a tie counts as half right, so a policy equal to
     its reference (all rewards 0) starts at 0.5, the accuracy of a coin.
Data: JSONL, {"prompt": ..., "completion": ..., "label": true/false} (strings or message lists); a
paired record {"prompt", "chosen", "rejected"} is split into a desirable and an undesirable one.
Run:  python algos/kto.py
      torchrun --nproc_per_node 8 algos/kto.py --model runs/qwen-sft --data labelled.jsonl --max_len 1024
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import all_logps, sequence_logps  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.template import encode_response  # noqa: E402


@dataclass
class Args:
    beta: float = 0.1  # β: strength of the KL regularisation toward πref (the implicit reward's scale)
    desirable_weight: float = 1.0  # λD; the paper advises λD·nD / (λU·nU) in [1, 4/3]
    undesirable_weight: float = 1.0  # λU
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # the frozen reference πref; default: --model
    data: str = ""  # JSONL of labelled completions (or pairs); default: the embedded labelled completions
    eval_data: str = ""  # held-out {"prompt","answer"} JSONL (generation accuracy); default: embedded, without --data
    eval_pairs: str = ""  # held-out pairs JSONL (preference accuracy); default: the embedded ones, without --data
    output_dir: str = "runs/kto"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # records longer than this are dropped (and counted)
    batch_size: int = 32  # records per process per micro-batch
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


def kto_loss(logps_N, ref_N, desirable_N, z_ref, beta, n_records, desirable_weight=1.0, undesirable_weight=1.0):
    """Σ_i (λ_yi - v_i) / n_records (the global record count) -> (loss, implicit rewards β·r)."""
    r = logps_N - ref_N  # log πθ(y|x) - log πref(y|x)
    z = torch.as_tensor(z_ref, dtype=r.dtype, device=r.device).detach().clamp(min=0)  # max(0, KL estimate), no grad
    lam = torch.where(desirable_N, desirable_weight, undesirable_weight)  # λD or λU
    v = lam * torch.sigmoid(beta * torch.where(desirable_N, r - z, z - r))  # the value of each completion
    return (lam - v).sum() / max(n_records, 1), (beta * r).detach()


def mismatched(prompts):
    """For each record k of a batch, the record whose completion makes its KL pair: the next one (cyclically)
    with another prompt, so no prompt meets its own completion, whatever the batch size (deviation 1)."""
    n = len(prompts)
    out = []
    for k in range(n):
        others = ((k + d) % n for d in range(1, n) if prompts[(k + d) % n] != prompts[k])
        out.append(next(others, (k + 1) % n))  # all prompts equal: the next record, as good as any
    return out


def load_records(path, tok, args):
    """-> [((ids, labels), desirable, prompt, completion)], labels on the completion tokens only."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        for prompt, completion, desirable in data.unpaired(rec, where):
            ids, labels = encode_response(tok, prompt, completion)
            if len(ids) > args.max_len:
                n_long += 1
            else:
                recs.append(((ids, labels), desirable, prompt, completion))
    return recs, n_long


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
    args.data = args.data or toy.data("kto.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.eval_pairs = args.eval_pairs or (toy.data("prefs_eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    tok = load_tokenizer(args.model, args.trust_remote_code)
    recs, n_long = load_records(args.data, tok, args)
    eval_pairs = load_pairs(args.eval_pairs, tok, args)[0] if args.eval_pairs else []
    eval_recs = []  # held-out {"prompt", "answer"}: generation accuracy
    if args.eval_data:
        eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                     for w, r in data.read_jsonl(args.eval_data)]
    if not recs:
        data.fail(f"{args.data}: no record fits max_len={args.max_len}")
    if args.eval_pairs and not eval_pairs:
        data.fail(f"{args.eval_pairs}: no pair fits max_len={args.max_len}")
    n_good = sum(d for _, d, _, _ in recs)
    say(f"{len(recs)} records ({n_good} desirable, {len(recs) - n_good} undesirable); "
        f"{n_long} longer than max_len={args.max_len} were dropped")
    G = args.batch_size * args.grad_accum * world  # records per optimizer step
    if len(recs) < G or G < 2:
        data.fail(f"{args.data}: {len(recs)} records; a global batch of {G} needs at least 2 (mismatched pairs) "
                  "and at most that many")
    steps_per_epoch = len(recs) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    n_epochs = -(-total_steps // steps_per_epoch)
    orders = [torch.randperm(len(recs), generator=torch.Generator().manual_seed(args.seed + e), device="cpu")
              for e in range(n_epochs)]
    plan = []  # the global batch of every step: record indices, a CPU tensor each
    for s in range(total_steps):
        first = s % steps_per_epoch * G
        plan.append(orders[s // steps_per_epoch][first:first + G])
    keys = [json.dumps(p) for _, _, p, _ in recs]  # records with equal prompts never form a mismatched pair
    kl_plan = []  # the mismatched (prompt, completion) pairs of every step's global batch, in batch order
    for idx in plan:
        idx = idx.tolist()
        pairs_of_step = []
        for k, j in enumerate(mismatched([keys[i] for i in idx])):  # prompt of record k, completion of record j
            ids, labels = encode_response(tok, recs[idx[k]][2], recs[idx[j]][3])
            pairs_of_step.append((ids[:args.max_len], labels[:args.max_len]))
        kl_plan.append(pairs_of_step)
    # One packed row pays where attention runs per document (varlen); sdpa (CPU) would mask a dense square: padding
    packed = args.packing and dist.attn_impl(device) != "sdpa"
    fwd_opts = dict(pad_id=tok.pad_token_id, packed=packed, budget=dist.logits_budget(args.loss_chunk, device),
                    device=device)

    # Reference: log πref of every record and mismatched pair the run will see, and of the held-out pairs,
    # in one pass; then freed. Each item a 1-tuple of one sequence, so all_logps returns (1, n) tensors.
    ref = dist.shard(load_model(args.ref_model, tok, device, args.trust_remote_code), world, device).eval()
    used = torch.cat(plan).unique()
    ref_used, _ = all_logps(ref, [(recs[j][0],) for j in used.tolist()], args.batch_size, **fwd_opts)
    ref_logps = torch.zeros(len(recs), device="cpu")  # kept on the CPU: each step copies its records' over
    ref_logps[used] = ref_used[0].cpu()
    kl_ref, _ = all_logps(ref, [(seq,) for kl in kl_plan for seq in kl], args.batch_size, **fwd_opts)
    kl_ref = kl_ref.view(total_steps, G)  # a row a step
    eval_seqs = [(c,) for c, _ in eval_pairs] + [(r,) for _, r in eval_pairs]  # all chosen sides, then all rejected
    eval_ref, _ = all_logps(ref, eval_seqs, args.batch_size, **fwd_opts)
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
            logps, _ = all_logps(model, eval_seqs, args.batch_size, **fwd_opts)
            rewards_c, rewards_r = (args.beta * (logps - eval_ref)).view(2, -1)  # β·r of chosen, of rejected
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            out["eval/pref_accuracy"] = right.mean().item()
            out["eval/margin"] = (rewards_c - rewards_r).mean().item()
        return out

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="kto")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, idx = step // steps_per_epoch, plan[step]
        firsts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this rank's micro-batches
        micro = [slice(first, first + args.batch_size) for first in firsts]
        n_records = G  # N of the equation: every record of the global batch counts once
        kl_sum = torch.zeros((), device=device)  # z_ref: the mean log-ratio of the global batch's mismatched pairs
        with torch.no_grad():
            for m in micro:
                kl_logps, _ = sequence_logps(model, kl_plan[step][m], **fwd_opts)
                kl_sum += (kl_logps - kl_ref[step, m]).sum()
        z_ref = (dist.all_sum(kl_sum) / G).clamp(min=0)  # on the device, no gradient: the host does not wait here
        loss_sum, sums = torch.zeros((), device=device), dist.Sums(device)  # this step's metrics, summed over records
        for i, m in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            batch = [recs[j] for j in idx[m].tolist()]
            seqs = [seq for seq, _, _, _ in batch]
            # log πθ(y|x) = Σ_t log softmax(logits_t)[y_t] over each response's tokens
            logps, lens = sequence_logps(model, seqs, **fwd_opts)
            good = dist.to_device(torch.tensor([d for _, d, _, _ in batch], device="cpu"), device)
            ref = dist.to_device(ref_logps[idx[m]], device)
            loss, rewards = kto_loss(logps, ref, good, z_ref, args.beta, n_records,
                                     args.desirable_weight, args.undesirable_weight)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()  # kept on the device: the host reads it when the step logs or saves
            bad = ~good  # the sides' sums as products with the flags: selecting by a mask would make the host wait
            sums.add({"logps/chosen": (logps.detach() * good).sum(), "logps/rejected": (logps.detach() * bad).sum(),
                      "logps/ref_chosen": (ref * good).sum(), "logps/ref_rejected": (ref * bad).sum(),
                      "rewards/chosen": (rewards * good).sum(), "rewards/rejected": (rewards * bad).sum(),
                      "desirable": good.sum(), "undesirable": bad.sum()})
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
            n_good = max(s["desirable"], 1)  # the chosen side: means over the step's desirable records
            n_bad = max(s["undesirable"], 1)  # the rejected side: over its undesirable records
            per_record = {"logps/chosen": s["logps/chosen"] / n_good, "logps/rejected": s["logps/rejected"] / n_bad,
                          "logps/ref_chosen": s["logps/ref_chosen"] / n_good,
                          "logps/ref_rejected": s["logps/ref_rejected"] / n_bad,
                          "rewards/chosen": s["rewards/chosen"] / n_good,
                          "rewards/rejected": s["rewards/rejected"] / n_bad}
            per_record["rewards/margin"] = per_record["rewards/chosen"] - per_record["rewards/rejected"]
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **per_record, kl=z_ref.item(), **extra)
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
