"""Direct Preference Optimization (DPO): the policy is its own reward model, trained on preference pairs.

DPO fits the Bradley-Terry model with the implicit reward r(x, y) = β·log(πθ(y|x) / πref(y|x)), which
is the reward whose KL-regularised optimum is πθ; no reward model and no sampling. Log-probs are the
sums over the response tokens only; chosen and rejected go through the policy in one forward:

    L(θ) = -(1/M) Σ_i log σ(β[(log πθ(yw|x) - log πref(yw|x)) - (log πθ(yl|x) - log πref(yl|x))])

Options: --label_smoothing ε (conservative DPO: -(1-ε)·log σ(βh) - ε·log σ(-βh), for noisy labels) and
--dpop_lambda λ (DPOP, arXiv:2402.13228: λ·max(0, log πref(yw|x) - log πθ(yw|x)) is subtracted inside the
β-scaled argument, so the chosen log-prob is not pushed below the reference). logps/chosen against
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
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.packing import boundaries  # noqa: E402
from common.template import IGNORE, encode_response  # noqa: E402


@dataclass
class Args:
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
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard) or wandb
    eval_every: int = 25  # steps between evaluations (0: only at the end)
    save_every: int = 25  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    compile: str = "auto"  # torch.compile each decoder layer (fuses elementwise work): true|false|auto (on CUDA)
    loss_chunk: int = -1  # millions of vocabulary-wide logits held at once; 0: full logits; -1: 128 on GPU, 0 on CPU
    packing: bool = True  # with a varlen kernel (GPU): a micro-batch's sequences in one row, no padding
    beta: float = 0.1  # β: strength of the KL regularisation toward πref (the implicit reward's scale)
    label_smoothing: float = 0.0  # ε of conservative DPO: the probability that a pair's label is flipped
    dpop_lambda: float = 0.0  # λ of DPOP: penalty on the chosen log-prob falling below the reference (0: off)


def token_logps(logits_NV, labels_N, chunk=4096):
    """log p(label) = logit[label] - logsumexp(logits), in chunks, so no full fp32 log-softmax exists."""
    out = []
    for i in range(0, max(len(labels_N), 1), chunk):
        logits_CV = logits_NV[i:i + chunk]
        picked_C = logits_CV.gather(-1, labels_N[i:i + chunk, None]).squeeze(-1).float()
        out.append(picked_C - torch.logsumexp(logits_CV.float(), dim=-1))
    return torch.cat(out)


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


def seq_logps(logps_N, labels_BT, seq_BT, n_seqs):
    """Log-probs of the labelled positions in batch order (label_logps) -> (Σ_t log π(y_t | x, y_<t) over each
    sequence's response tokens, |y| the count of those tokens), for sequences 0..n_seqs-1. labels_BT and seq_BT
    (the sequence each position belongs to) as collate returns them, on the CPU: no wait for the GPU."""
    seq_N = seq_BT[:, 1:][labels_BT[:, 1:] != IGNORE]  # logits at t predict the label at t+1, of the same sequence
    seq_N = dist.to_device(seq_N, logps_N.device)
    sums = torch.zeros(n_seqs, device=logps_N.device).index_add(0, seq_N, logps_N)
    lens = torch.zeros(n_seqs, dtype=torch.long, device=logps_N.device).index_add(0, seq_N, torch.ones_like(seq_N))
    return sums, lens


def collate(seqs, pad_id, packing, device):
    """Sequences (ids, labels) -> (forward kwargs on the device, labels_BT, seq_BT: the sequence each position
    belongs to; these two on the CPU, where label_logps and seq_logps read them).
    Packed: one row of every sequence back to back, each a document of its own (position_ids restart at 0; varlen
    attention keeps them apart by their boundaries, sdpa by a mask from position_ids), so no padding is computed.
    Else right-padded rows, as long as the longest sequence.
    Built on the CPU and copied with dist.to_device (pinned, asynchronous: no wait for the GPU)."""
    if packing:
        lengths = torch.tensor([len(ids) for ids, _ in seqs], device="cpu")
        pos = torch.cat([torch.arange(n, device="cpu") for n in lengths.tolist()])[None]
        ids = torch.tensor([[t for ids, _ in seqs for t in ids]], device="cpu")
        labels = torch.tensor([[t for _, lab in seqs for t in lab]], device="cpu")
        seq = torch.repeat_interleave(torch.arange(len(seqs), device="cpu"), lengths)[None]
        fwd = {"input_ids": dist.to_device(ids, device), "position_ids": dist.to_device(pos, device),
               **boundaries(pos, device)}
        return fwd, labels, seq
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in seqs], device="cpu")
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in seqs], device="cpu")
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs], device="cpu")
    seq = torch.arange(len(seqs), device="cpu")[:, None].expand(-1, width)
    fwd = {"input_ids": dist.to_device(ids, device), "attention_mask": dist.to_device(mask, device)}
    return fwd, labels, seq


def dpo_loss(logps_c_M, logps_r_M, ref_c_M, ref_r_M, beta, n_pairs, label_smoothing=0.0, dpop_lambda=0.0):
    """Σ_i DPO loss of pair i / n_pairs (the global pair count) -> (loss, implicit rewards of chosen, of rejected)."""
    ratio_c, ratio_r = logps_c_M - ref_c_M, logps_r_M - ref_r_M  # log πθ(y|x) - log πref(y|x)
    # DPOP: h gets - λ·max(0, log πref(yw|x) - log πθ(yw|x))
    h = ratio_c - ratio_r - dpop_lambda * (-ratio_c).clamp(min=0)
    # -(1-ε)·log σ(βh) - ε·log σ(-βh); logsigmoid stays finite for any margin
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.sum() / max(n_pairs, 1), (beta * ratio_c).detach(), (beta * ratio_r).detach()


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
    rank, world, device = dist.setup(args.seed)
    if args.compile not in ("auto", "true", "false"):
        data.fail("--compile must be auto|true|false")
    # auto: compiled on CUDA, where fusing the layers' elementwise work made SFT 1.20-1.31x faster on an H200; eager
    # on CPU, where the embedded task's tests were calibrated
    compiled = args.compile == "true" or (args.compile == "auto" and device.type == "cuda")
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("prefs.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.eval_pairs = args.eval_pairs or (toy.data("prefs_eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)
    if args.model == "runs/sft" and not os.path.exists(args.model):
        data.fail("runs/sft not found: run algos/sft.py first, or pass --model")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load tokenizer {args.model!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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

    def load(name):
        """A causal LM with every dropout off, whatever its config calls it: exact log-probs (deviation 2)."""
        try:
            cfg = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
            for c in (cfg, cfg.get_text_config()):  # attention dropout is often a config rate, not a module
                c.update({k: 0.0 for k, v in c.to_dict().items() if "dropout" in k and isinstance(v, float)})
            m = AutoModelForCausalLM.from_pretrained(name, config=cfg, dtype=torch.float32,
                                                     attn_implementation=dist.attn_impl(device),
                                                     trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            data.fail(f"cannot load model {name!r}: {str(e).splitlines()[0]}")
        n_embed = m.get_input_embeddings().num_embeddings
        if len(tok) > n_embed:
            data.fail(f"tokenizer has {len(tok)} tokens but model {name!r} embeds only {n_embed}")
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        return dist.shard(m, world, device)

    # One packed row pays where attention runs per document (varlen, flash-attn); sdpa would mask a dense
    # (row x row) square, slower than padding short sequences, so on sdpa (CPU) the rows are padded.
    packed = args.packing and dist.attn_impl(device) != "sdpa"

    def logps_of(model, seqs):
        """Sequences (ids, labels) in one forward -> (summed response log-probs, response lengths)."""
        fwd, labels, seq = collate(seqs, tok.pad_token_id, packed, device)
        with dist.autocast(device):
            logps_N = label_logps(model, fwd, labels, dist.logits_budget(args.loss_chunk, device))
        return seq_logps(logps_N, labels, seq, len(seqs))

    @torch.no_grad()
    def all_logps(model, some_pairs):
        """Of every pair, (n,) tensors on the device: logps_chosen log π(yw|x), logps_rejected log π(yl|x),
        len_chosen |yw|, len_rejected |yl|. Split over processes in equal forward counts (FSDP all-gathers in
        each), a rank without pairs left repeating pair 0 and discarding it."""
        out_n4 = torch.zeros(len(some_pairs), 4, device=device)
        for i in range(0, len(some_pairs), world * args.batch_size):
            mine = list(range(i + rank * args.batch_size, min(i + (rank + 1) * args.batch_size, len(some_pairs))))
            batch = [some_pairs[j] for j in mine] or some_pairs[:1]
            logps, lens = logps_of(model, [c for c, _ in batch] + [r for _, r in batch])
            out_n4[mine] = torch.stack([*logps.chunk(2), *lens.chunk(2)], -1).float()[:len(mine)]
        out_n4 = dist.all_sum(out_n4).to(device, torch.float32)
        return dict(zip(("logps_chosen", "logps_rejected", "len_chosen", "len_rejected"), out_n4.unbind(-1)))

    # Reference: log πref of every pair the run will see, and of the held-out pairs, in one pass; then freed.
    ref = load(args.ref_model).eval()
    used = torch.cat(plan).unique()
    ref_used = all_logps(ref, [pairs[j] for j in used.tolist()])
    ref_chosen = torch.zeros(len(pairs), device="cpu")  # kept on the CPU: each step copies its pairs' over
    ref_rejected = torch.zeros(len(pairs), device="cpu")
    ref_chosen[used] = ref_used["logps_chosen"].cpu()
    ref_rejected[used] = ref_used["logps_rejected"].cpu()
    eval_ref = all_logps(ref, eval_pairs)
    del ref

    # Policy, sharded with FSDP2 when there are several processes.
    model = load(args.model).train()  # train mode only matters to --gradient_checkpointing: dropout is 0
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    if compiled:
        dist.compile_layers(model)
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

    def evaluate():
        """Generation accuracy on eval_data, preference accuracy and margin on eval_pairs; {} without either."""
        out = {}
        if eval_recs:
            out["eval/accuracy"] = toy.evaluate(model, tok, eval_recs)
        if eval_pairs:
            lp = all_logps(model, eval_pairs)
            _, rewards_c, rewards_r = dpo_loss(lp["logps_chosen"], lp["logps_rejected"],
                                               eval_ref["logps_chosen"], eval_ref["logps_rejected"], args.beta, 1)
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            out["eval/pref_accuracy"] = right.mean().item()
            out["eval/margin"] = (rewards_c - rewards_r).mean().item()
        return out

    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="dpo")
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
            logps, lens = logps_of(model, seqs)
            logps_c, logps_r = logps.chunk(2)
            ref_c, ref_r = (dist.to_device(table[m], device) for table in (ref_chosen, ref_rejected))
            loss, rewards_c, rewards_r = dpo_loss(logps_c, logps_r, ref_c, ref_r, args.beta, n_pairs,
                                                  args.label_smoothing, args.dpop_lambda)
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
    dist.save_model(model, tok, args.output_dir, rank)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
