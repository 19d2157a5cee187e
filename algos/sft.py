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
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.packing import boundaries, fit, pack, pad  # noqa: E402
from common.template import IGNORE, encode_chat  # noqa: E402


@dataclass
class Args:
    model: str = ""  # path or hub name; default: the embedded base model
    data: str = ""  # JSONL of conversations; default: the embedded SFT set
    eval_data: str = ""  # {"prompt","answer"} (accuracy) or chats (loss); default: the embedded eval set if no --data
    output_dir: str = "runs/sft"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 256  # tokens per packed row (or per document when padding)
    packing: bool = True  # pack documents into rows (False: one padded document per row)
    truncate: bool = True  # documents longer than max_len are truncated (False: dropped); counted either way
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
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard) or wandb
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    save_every: int = 100  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    loss_chunk: int = -1  # millions of vocabulary-wide logits held at once; 0: full logits; -1: 128 on GPU, 0 on CPU
    compile: str = "auto"  # torch.compile each decoder layer (fuses elementwise work): true|false|auto (on CUDA)


def token_logps(logits_NV, labels_N, chunk=4096):
    """log p(label) = logit[label] - logsumexp(logits), in chunks, so no full fp32 log-softmax exists."""
    out = []
    for i in range(0, max(len(labels_N), 1), chunk):
        logits = logits_NV[i:i + chunk]
        picked = logits.gather(-1, labels_N[i:i + chunk, None]).squeeze(-1).float()
        out.append(picked - torch.logsumexp(logits.float(), dim=-1))
    return torch.cat(out)  # an empty selection still yields a (0,)-tensor in the graph: backward gives 0, not an error


class ChunkedLogps(torch.autograd.Function):
    """log p(y_n) = h_n·w_{y_n} - logsumexp_v h_n·w_v for N positions, from hidden states h (N, H) and the output
    embedding w (V, H), `chunk` positions at a time. Forward keeps only each position's logsumexp; backward
    recomputes the logits as many at a time, a slice of the vocabulary for all N positions, so each slice of ∂/∂w
    is one product written once and only ∂/∂h (N x H) accumulates. So memory grows with chunk x V instead of N x V
    (at N = 16k tokens and a 152k vocabulary the full logits and their gradient take 10 GB in bf16), for one more
    h·w product. Gradients:
        ∂log p(y_n)/∂logits_n = onehot(y_n) - softmax(logits_n),
        ∂/∂h_n = (...)·w,  ∂/∂w = Σ_n (...)ᵀ h_n.
    The matrix products run in the autocast dtype when autocast is on (forward decides; backward follows). The
    arithmetic over a chunk's logits (logsumexp; softmax, one-hot and cast in backward) is compiled on CUDA: one
    pass over the chunk instead of about ten in fp32, for the memory traffic of a 152k vocabulary."""

    compiled = {}

    @staticmethod
    def lse(logits_CV):
        """logsumexp over the vocabulary, in fp32 whatever the logits' dtype."""
        return torch.logsumexp(logits_CV.float(), dim=-1)

    @staticmethod
    def grad_logits(logits_CV, lse_C, labels_C, g_C):
        """g_n·(onehot(y_n) - softmax(logits_n)), computed in fp32 and returned in the logits' dtype. One pointwise
        expression (the one-hot as a comparison with the vocabulary index), so the compiled version is one kernel."""
        onehot = torch.arange(logits_CV.shape[-1], device=logits_CV.device) == labels_C[:, None]
        softmax = torch.exp(logits_CV.float() - lse_C[:, None])
        return (g_C.float()[:, None] * (onehot.float() - softmax)).to(logits_CV.dtype)

    @staticmethod
    def fused(name, device):
        """ChunkedLogps.<name>, compiled on CUDA (dynamic shapes: a shorter last chunk does not recompile); as is on
        CPU, where full logits are the default and compiling would cost more than it saves."""
        fn = getattr(ChunkedLogps, name)
        if device.type != "cuda":
            return fn
        if name not in ChunkedLogps.compiled:
            ChunkedLogps.compiled[name] = torch.compile(fn, dynamic=True)
        return ChunkedLogps.compiled[name]

    @staticmethod
    def forward(ctx, h_NH, w_VH, labels_N, chunk):
        device = h_NH.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w_VH.dtype
        w, lse = w_VH.to(dtype), ChunkedLogps.fused("lse", h_NH.device)
        lse_N = torch.empty(len(labels_N), device=h_NH.device)
        logps_N = torch.empty(len(labels_N), device=h_NH.device)
        for i in range(0, len(labels_N), chunk):
            logits = h_NH[i:i + chunk].to(dtype) @ w.T
            lse_N[i:i + chunk] = lse(logits)
            picked = logits.gather(-1, labels_N[i:i + chunk, None]).squeeze(-1).float()
            logps_N[i:i + chunk] = picked - lse_N[i:i + chunk]
        ctx.save_for_backward(h_NH, w_VH, labels_N, lse_N)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logps_N

    @staticmethod
    def backward(ctx, grad_N):
        h_NH, w_VH, labels_N, lse_N = ctx.saved_tensors
        V = w_VH.shape[0]
        rows = max(1, ctx.chunk * V // max(len(labels_N), 1))  # vocabulary rows a slice: the forward's logit count
        h, grad_logits = h_NH.to(ctx.dtype), ChunkedLogps.fused("grad_logits", h_NH.device)
        grad_h = torch.zeros(h_NH.shape, device=h_NH.device)  # fp32 accumulator over the slices
        grad_w = torch.empty_like(w_VH)  # each slice's rows written once
        for v in range(0, V, rows):
            w = w_VH[v:v + rows].to(ctx.dtype)
            g = grad_logits(h @ w.T, lse_N, labels_N - v, grad_N)  # ∂L/∂logits of the slice: one-hot where y_n is
            grad_h += g @ w
            grad_w[v:v + rows] = g.T @ h
        return grad_h.to(h_NH.dtype), grad_w, None, None


def label_logps(model, fwd, labels_BT, budget):
    """log πθ(x_{t+1} | x_≤t) at every labelled position, in their order in the batch. budget > 0: from the final
    hidden states and the output embedding through ChunkedLogps (an empty logits_to_keep: the model computes no
    logits), as many positions a chunk as `budget` logits allow (883 of a 152k vocabulary at 2^27; a small
    vocabulary takes a whole batch in one chunk); 0: from the model's full logits, equal up to float rounding
    (for models that post-process them, e.g. soft-capping). Run under autocast. use_cache=False: with a cache,
    transformers ignores position_ids when masking (packed documents would leak).
    labels_BT on the CPU, as the scripts build them: the labelled positions are found there and copied over as
    indices, so the host never waits for the GPU (selecting with a mask on the GPU would wait to learn the count)."""
    device = fwd["input_ids"].device
    labels = labels_BT.cpu()  # a no-op for CPU labels
    row, t = (labels[:, 1:] != IGNORE).nonzero().unbind(-1)  # position t of a row predicts the label at t + 1
    at_N = dist.to_device(row * labels.shape[1] + t, device)  # those positions, in the rows flattened
    labels_N = dist.to_device(labels[row, t + 1], device)
    if not budget:
        return token_logps(model(**fwd, use_cache=False).logits.flatten(0, 1)[at_N], labels_N)
    none = torch.zeros(0, dtype=torch.long, device=device)
    out = model(**fwd, use_cache=False, output_hidden_states=True, logits_to_keep=none)
    h = out.hidden_states[-1].flatten(0, 1)[at_N]  # the last hidden state, after the final norm
    w = model.get_output_embeddings().weight
    return ChunkedLogps.apply(h, w, labels_N, max(1, budget // w.shape[0]))


def sft_loss(logits_BTV, labels_BT, n_tokens):
    """Σ over labelled positions of -log πθ(x_t | x_<t), divided by n_tokens, the global label count.
    Logits at t predict the label at t+1. A micro-batch with no labels contributes exactly 0."""
    labels = labels_BT[:, 1:]
    mask = labels != IGNORE
    return -token_logps(logits_BTV[:, :-1][mask], labels[mask]).sum() / max(n_tokens, 1)


def load_docs(path, tok, args):
    docs = [encode_chat(tok, data.conversation(rec, where)) for where, rec in data.read_jsonl(path)]
    docs, n_long = fit(docs, args.max_len, args.truncate)
    docs = [d for d in docs if any(l != IGNORE for l in d[1][1:])]
    return docs, n_long


def main(args):
    rank, world, device = dist.setup(args.seed)
    if args.compile not in ("auto", "true", "false"):
        data.fail("--compile must be auto|true|false")
    # auto: compiled on CUDA, where fusing the layers' elementwise work ran 1.20-1.31x faster (0.5B shape, H200) for
    # about 15 s of compiling; eager on CPU, where the embedded task's tests were calibrated
    compiled = args.compile == "true" or (args.compile == "auto" and device.type == "cuda")
    args.model = args.model or toy.ensure("base")
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("sft.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load tokenizer {args.model!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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

    # Model, sharded with FSDP2 when there are several processes.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation=dist.attn_impl(device),
            trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load model {args.model!r}: {str(e).splitlines()[0]}")
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tok) > n_embed:
        data.fail(f"tokenizer has {len(tok)} tokens but model {args.model!r} embeds only {n_embed}")
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    if compiled:
        dist.compile_layers(model)
    model = dist.shard(model, world, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")  # one kernel for the whole update on CUDA
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt = os.path.join(args.output_dir, "checkpoint")
    start = dist.load_checkpoint(ckpt, model, opt, sched, rank) if args.resume else 0
    if rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    metrics = data.Metrics(args.output_dir, rank == 0, resume_step=start, report_to=args.report_to, config=asdict(args))
    if start:
        say(f"resumed from {ckpt} at step {start}")

    def batch_of(idx):
        """Rows idx -> the forward's tensors on device (packed rows: position_ids and document boundaries, no
        attention mask; a padded batch: its attention mask) and the labels on the CPU, where label_logps reads
        them; with their counts of labels and real tokens, taken on the CPU."""
        if args.packing:
            b = {k: rows[k][idx] for k in ("input_ids", "labels", "position_ids", "n_real")}
            # cu_seq_lens and max_length, from the CPU position_ids: flash-attn and varlen attention keep the
            # documents of several rows apart with them (sdpa ignores them and masks from position_ids)
            extra = boundaries(b["position_ids"], device)
        else:
            b = pad([docs[i] for i in idx.tolist()], tok.pad_token_id)
            b["n_real"], extra = b["attention_mask"].sum(-1), {}
        counts = {"n_labels": int((b["labels"][:, 1:] != IGNORE).sum()), "n_real": int(b.pop("n_real").sum())}
        return {**{k: v if k == "labels" else dist.to_device(v, device) for k, v in b.items()}, **extra}, counts

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
                b = {k: v.to(device) for k, v in pad(chunk or eval_docs[:1], tok.pad_token_id).items()}
                with dist.autocast(device):
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                n_labels = (b["labels"][:, 1:] != IGNORE).sum()
                if chunk:  # a process out of documents runs a stand-in batch and counts nothing
                    sums.add({"loss": sft_loss(out.logits, b["labels"], 1), "tokens": n_labels})
        model.train()
        s = sums.reduce()
        return {"eval/loss": s["loss"] / s["tokens"]}

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
        batches = [batch_of(m) for m in micro]
        # N of the equation: labelled tokens of the global batch (counted on the CPU: no wait for the GPU here)
        n_tokens = dist.all_sum(sum(counts["n_labels"] for _, counts in batches)).item()
        loss_sum = torch.zeros((), device=device)
        for i, (b, counts) in enumerate(batches):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            fwd = {k: v for k, v in b.items() if k != "labels"}  # ids, positions or mask, boundaries
            with dist.autocast(device):
                logps = label_logps(model, fwd, b["labels"], dist.logits_budget(args.loss_chunk, device))
            loss = -logps.sum() / max(n_tokens, 1)  # sft_loss, from the labelled positions' log-probabilities
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()  # kept on the device: the host reads it only when it logs or saves
            tokens += counts["n_real"]
        gnorm = dist.clip_grads(model, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        log_now = done % args.log_every == 0 or done == total_steps
        if log_now or (args.save_every and done % args.save_every == 0):
            loss_step = dist.all_sum(loss_sum).item()  # the first host sync of the step
            if not math.isfinite(loss_step):
                data.fail(f"non-finite loss {loss_step} at step {done}; stopping without saving a model")
        if log_now:
            tps = dist.all_sum(tokens).item() / (time.time() - t_log)
            extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == total_steps else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **extra)
            t_log, tokens = time.time(), 0.0
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            dist.save_checkpoint(ckpt, model, opt, sched, done, rank)
    dist.save_model(model, tok, args.output_dir, rank)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
