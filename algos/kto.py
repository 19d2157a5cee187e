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
from dataclasses import asdict, dataclass

import torch
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
    desirable_weight: float = 1.0  # λD; the paper advises λD·nD / (λU·nU) in [1, 4/3]
    undesirable_weight: float = 1.0  # λU


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
    rank, world, device = dist.setup(args.seed)
    if args.compile not in ("auto", "true", "false"):
        data.fail("--compile must be auto|true|false")
    # auto: compiled on CUDA, where fusing the layers' elementwise work made SFT 1.20-1.31x faster on an H200; eager
    # on CPU, where the embedded task's tests were calibrated
    compiled = args.compile == "true" or (args.compile == "auto" and device.type == "cuda")
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("kto.jsonl")
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

    def load(name):
        """A causal LM with every dropout off, whatever its config calls it: exact log-probs (deviation 3)."""
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
    def all_logps(model, seqs):
        """(n,) on the device: log π(y|x) of every sequence, split over processes in equal forward counts
        (FSDP all-gathers in each), a rank without sequences left repeating sequence 0 and discarding it."""
        out_n = torch.zeros(len(seqs), device=device)
        for i in range(0, len(seqs), world * args.batch_size):
            mine = list(range(i + rank * args.batch_size, min(i + (rank + 1) * args.batch_size, len(seqs))))
            batch = [seqs[j] for j in mine] or seqs[:1]
            logps, _ = logps_of(model, batch)
            out_n[mine] = logps.float()[:len(mine)]
        return dist.all_sum(out_n).to(device, torch.float32)

    # Reference: log πref of every record and mismatched pair the run will see, and of the held-out pairs,
    # in one pass; then freed.
    ref = load(args.ref_model).eval()
    used = torch.cat(plan).unique()
    ref_logps = torch.zeros(len(recs), device="cpu")  # kept on the CPU: each step copies its records' over
    ref_logps[used] = all_logps(ref, [recs[j][0] for j in used.tolist()]).cpu()
    kl_ref = all_logps(ref, [seq for kl in kl_plan for seq in kl]).view(total_steps, G)
    eval_seqs = [c for c, _ in eval_pairs] + [r for _, r in eval_pairs]
    eval_ref = all_logps(ref, eval_seqs)
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
            lp = all_logps(model, eval_seqs)
            rewards_c, rewards_r = (args.beta * (lp - eval_ref)).chunk(2)  # β·r of chosen, of rejected
            right = (rewards_c > rewards_r).float() + 0.5 * (rewards_c == rewards_r).float()
            out["eval/pref_accuracy"] = right.mean().item()
            out["eval/margin"] = (rewards_c - rewards_r).mean().item()
        return out

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
                kl_logps, _ = logps_of(model, kl_plan[step][m])
                kl_sum += (kl_logps - kl_ref[step, m]).sum()
        z_ref = (dist.all_sum(kl_sum) / G).clamp(min=0)  # on the device, no gradient: the host does not wait here
        loss_sum, sums = torch.zeros((), device=device), dist.Sums(device)  # this step's metrics, summed over records
        for i, m in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            batch = [recs[j] for j in idx[m].tolist()]
            seqs = [seq for seq, _, _, _ in batch]
            logps, lens = logps_of(model, seqs)
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
    dist.save_model(model, tok, args.output_dir, rank)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
