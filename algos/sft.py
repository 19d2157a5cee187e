"""Supervised fine-tuning (SFT): next-token likelihood of the assistant turns only.

Each conversation is rendered by the model's own chat template; only assistant tokens (and their
end-of-turn token) carry labels, over every assistant turn of a multi-turn chat. Documents are
packed into rows of --max_len tokens with position_ids restarting per document, so no document
attends to another (--packing false pads instead). The loss is normalised by the global number of
assistant tokens in the optimizer step, so it is the same whatever --grad_accum and process count:

    L(θ) = -(1/N) Σ_i Σ_{t ∈ A_i} log πθ(x_{i,t} | x_{i,<t}),
    A_i = assistant positions of chat i,  N = Σ_i |A_i|

Reference: InstructGPT, arXiv:2203.02155 (the SFT stage).
Data: JSONL, {"messages": [{"role", "content"}, ...]} or {"prompt": ..., "completion": ...}.
Run:  python algos/sft.py
      torchrun --nproc_per_node 8 algos/sft.py --model Qwen/Qwen2.5-0.5B --data chats.jsonl --max_len 2048
"""
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
from common.logps import label_logps  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.packing import boundaries, fit, pack, pad  # noqa: E402
from common.template import IGNORE, encode_chat  # noqa: E402


@dataclass
class Args:
    packing: bool = True  # pack documents into rows (False: one padded document per row)
    truncate: bool = True  # documents longer than max_len are truncated (False: dropped); counted either way
    model: str = ""  # path or hub name; default: the embedded base model
    data: str = ""  # JSONL of conversations; default: the embedded SFT set
    eval_data: str = ""  # {"prompt","answer"} (accuracy) or chats (loss); default: the embedded eval set if no --data
    output_dir: str = "runs/sft"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 256  # tokens per packed row (or per document when padding)
    batch_size: int = 8  # rows per process per micro-batch (a packed row holds several documents)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 2000  # optimizer steps; 0: run --epochs over the data
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
    compile: Literal["auto", "true", "false"] = "auto"  # torch.compile each decoder layer; auto: on CUDA
    loss_chunk: int = -1  # millions of vocabulary-wide logits held at once; 0: full logits; -1: 128 on GPU, 0 on CPU


def sft_loss(logps_N, n_tokens):
    """-(1/N) Σ_{t ∈ A} log πθ(x_t | x_<t) over a micro-batch's assistant positions A, N = n_tokens the labelled
    tokens of the whole optimizer step (every micro-batch and process), so the step's loss is the same whatever
    --grad_accum and the process count. A micro-batch with no labels contributes exactly 0."""
    return -logps_N.sum() / max(n_tokens, 1)


def load_docs(path, tok, args):
    """-> (documents (ids, labels) with a label after their first token, the count longer than max_len)."""
    docs = [encode_chat(tok, data.conversation(rec, where)) for where, rec in data.read_jsonl(path)]
    docs, n_long = fit(docs, args.max_len, args.truncate)
    docs = [d for d in docs if any(l != IGNORE for l in d[1][1:])]
    return docs, n_long


def batch_of(idx, rows, docs, pad_id, device):
    """The micro-batch of rows idx -> (the forward's tensors on device, the labels kept on the CPU where label_logps
    reads them; its counts of labels and of real tokens, taken on the CPU). Packed rows (rows): position_ids and
    document boundaries, no attention mask; rows None: the documents idx, right-padded, with their attention mask."""
    if rows is not None:
        b = {k: rows[k][idx] for k in ("input_ids", "labels", "position_ids", "n_real")}
        # cu_seq_lens and max_length, from the CPU position_ids: flash-attn and varlen attention keep the
        # documents of several rows apart with them (sdpa ignores them and masks from position_ids)
        extra = boundaries(b["position_ids"], device)
    else:
        b = pad([docs[i] for i in idx.tolist()], pad_id)
        b["n_real"], extra = b["attention_mask"].sum(-1), {}
    counts = {"n_labels": int((b["labels"][:, 1:] != IGNORE).sum()), "n_real": int(b.pop("n_real").sum())}
    return {**{k: v if k == "labels" else dist.to_device(v, device) for k, v in b.items()}, **extra}, counts


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    compiled = data.resolve(args.compile, auto=device.type == "cuda")  # eager on CPU, where tests were calibrated
    args.model = args.model or toy.ensure("base")
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("sft.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    tok = load_tokenizer(args.model, args.trust_remote_code)
    docs, n_long = load_docs(args.data, tok, args)
    if not docs:
        data.fail(f"{args.data}: no document has an assistant token within max_len={args.max_len}")
    fate = "truncated" if args.truncate else "dropped"
    say(f"{len(docs)} documents; {n_long} longer than max_len={args.max_len} were {fate}")
    eval_recs = data.read_jsonl(args.eval_data) if args.eval_data else []
    eval_acc = bool(eval_recs) and "answer" in eval_recs[0][1]  # {"prompt", "answer"}: accuracy; chats: eval loss
    if eval_acc:
        eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                     for w, r in eval_recs]
    elif eval_recs:
        eval_docs, _ = load_docs(args.eval_data, tok, args)
        if not eval_docs:
            data.fail(f"{args.eval_data}: no conversation has an assistant token within max_len={args.max_len}")
    rows = pack(docs, args.max_len, tok.pad_token_id) if args.packing else None
    n_rows = len(rows["input_ids"]) if args.packing else len(docs)
    G = args.batch_size * args.grad_accum * world  # rows per optimizer step
    if n_rows < G:
        data.fail(f"{args.data}: {n_rows} rows, fewer than one global batch of {G}")
    steps_per_epoch = n_rows // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    budget = dist.logits_budget(args.loss_chunk, device)

    # Model (dropout kept as its config sets it: SFT compares no log-ratios), optimizer, schedule
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code, dropout=True), args)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    if compiled:
        dist.compile_layers(model)
    model = dist.shard(model, world, device).train()
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def evaluate():
        """{} without an eval set; else eval/accuracy (greedy exact match) or eval/loss (per assistant token)."""
        if not eval_recs:
            return {}
        if eval_acc:
            return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)}
        model.eval()
        sums = dist.Sums(device)
        sums.add({"loss": 0.0, "tokens": 0})  # every process adds both names, even one without an eval document
        per = -(-len(eval_docs) // world)  # documents per process
        mine = eval_docs[rank * per:(rank + 1) * per]
        with torch.no_grad():
            for i in range(0, per, args.batch_size):  # the same number of forwards on every process (FSDP all-gathers)
                chunk = mine[i:i + args.batch_size]
                b = pad(chunk or eval_docs[:1], tok.pad_token_id)
                fwd = {k: dist.to_device(b[k], device) for k in ("input_ids", "attention_mask")}
                with dist.autocast(device):
                    logps = label_logps(model, fwd, b["labels"], budget)
                if chunk:  # a process out of documents runs a stand-in batch and counts nothing
                    sums.add({"loss": sft_loss(logps, 1), "tokens": len(logps)})
        model.train()
        s = sums.reduce()
        return {"eval/loss": s["loss"] / s["tokens"]}

    # Loop
    if start == 0 and eval_recs:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="sft")
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        gen = torch.Generator().manual_seed(args.seed + epoch)  # the data order: the same on every process
        order = torch.randperm(n_rows, generator=gen, device="cpu")
        idx = order[k * G:(k + 1) * G]
        starts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this process's micro-batches
        micro = [idx[j:j + args.batch_size] for j in starts]
        batches = [batch_of(m, rows, docs, tok.pad_token_id, device) for m in micro]
        # N of the equation: labelled tokens of the global batch (counted on the CPU: no wait for the GPU here)
        n_tokens = dist.all_sum(sum(counts["n_labels"] for _, counts in batches)).item()
        loss_sum = torch.zeros((), device=device)
        for i, (b, counts) in enumerate(batches):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            fwd = {k: v for k, v in b.items() if k != "labels"}  # ids, positions or mask, boundaries
            # log πθ(x_t | x_<t) = log softmax(logits)[x_t] at every labelled position (label_logps)
            with dist.autocast(device):
                logps = label_logps(model, fwd, b["labels"], budget)
            loss = sft_loss(logps, n_tokens)  # this micro-batch's share: Σ over its labelled tokens / N
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()  # kept on the device: the host reads it only when it logs or saves
            tokens += counts["n_real"]
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
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **extra)
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
