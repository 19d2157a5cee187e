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
Data: JSONL, {"prompt": ..., "answer": ...}; reward = common.toy.verify (with --reward_model "answer" is optional).
Run:  python algos/online_dpo.py
      torchrun --nproc_per_node 8 algos/online_dpo.py --model runs/qwen-sft --data prompts.jsonl --reward_model runs/rm
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DynamicCache, GenerationConfig, StaticCache, get_cosine_schedule_with_warmup)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.packing import boundaries  # noqa: E402
from common.template import IGNORE, encode_prompt  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # the frozen reference πref; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt","answer"} JSONL (generation accuracy); default: embedded, without --data
    reward_model: str = ""  # sequence-classification reward model (rm.py) scoring the samples; default: the verifier
    output_dir: str = "runs/online_dpo"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    batch_size: int = 64  # prompts per process per micro-batch (each sampled twice: at most one pair)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_new_tokens: int = 12  # completion length limit
    static_cache: str = "auto"  # static KV cache, compiled decode (see generate): true|false|auto (one CUDA process)
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
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard) or wandb
    eval_every: int = 50  # steps between evaluations (0: only at the end)
    save_every: int = 50  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
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


def make_pairs(rewards_a_B, rewards_b_B, identical_B=None):
    """Two samples a, b of each of B prompts -> (kept_M: the prompts whose samples' rewards differ, a_chosen_M: a has
    the higher reward there). A tie, identical samples among them (identical_B, for a reward model's rounding noise),
    carries no preference and is dropped."""
    differ_B = rewards_a_B != rewards_b_B
    if identical_B is not None:
        differ_B = differ_B & ~identical_B
    kept_M = differ_B.nonzero().squeeze(-1)
    return kept_M, rewards_a_B[kept_M] > rewards_b_B[kept_M]


@torch.no_grad()
def generate(model, prompts, G, tok, gen_cfg, device, synced=False, static_len=0):
    """Batched sampling with the KV cache: prompts left-padded, each prefilled once and its cache copied to its G rows.
    static_len > 0: a fixed-size cache of that many positions instead, with which transformers compiles the decode
    step on CUDA (CUDA graphs: one launch per token instead of one per kernel; the first call compiles); every row
    then prefills its own copy of the prompt, a small cost beside the decode. Sampling runs without autocast, in the
    weights' own dtype (the policy's fp32, or bf16 through bf16_sampler): under autocast the weights would be cast
    again at every token, and keys (fp32 after RoPE) and values (bf16) would disagree in a fixed-size cache.
    -> completions comp_NC (N = B·G, a prompt's samples consecutive), mask_NC (the tokens up to and including the
    first EOS; padding after it excluded), ended_N (an EOS was produced)."""
    width = max(map(len, prompts))
    x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with dist.gathered(model):  # under FSDP2: the weights gathered once for all tokens, not at every token
        if static_len:
            cache = StaticCache(config=model.config, max_cache_len=static_len)
        else:
            cache = DynamicCache(config=model.config)
            prefix_pos = (attn[:, :-1].cumsum(-1) - 1).clamp(min=0)
            model(input_ids=x[:, :-1], attention_mask=attn[:, :-1], position_ids=prefix_pos, use_cache=True,
                  **dist.cache_kwarg(model, cache))
            cache.batch_repeat_interleave(G)
        out = model.generate(input_ids=x.repeat_interleave(G, 0), attention_mask=attn.repeat_interleave(G, 0),
                             generation_config=gen_cfg, synced_gpus=synced, **dist.cache_kwarg(model, cache))
    comp_NC, C = out[:, width:], out.shape[1] - width
    is_eos = comp_NC == tok.eos_token_id
    ended_N = is_eos.any(-1)
    first_N = torch.where(ended_N, is_eos.int().argmax(-1), C)
    return comp_NC, torch.arange(C, device=device)[None] <= first_N[:, None], ended_N


@torch.no_grad()
def bf16_sampler(model, sampler=None):
    """The policy's weights in bf16 for sampling with the fixed-size cache: a copy of the module whose parameters are
    bf16 casts (no fp32 duplicate is made; tied weights stay tied), built on the first call and refreshed in place
    from the policy on each later one. With the fp32 weights, every decode product and the attention ran on the GPU's
    fp32 cores (an H200 profile of 64 rows x 256 tokens: 11 of 13.5 GPU-ms a token); bf16 puts them on the tensor
    cores, at the precision of the bf16-autocast forwards that score the samples. Costs 2 bytes a parameter."""
    if sampler is None:
        bf16 = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in model.parameters()}
        return copy.deepcopy(model, bf16).eval()
    for s, p in zip(sampler.parameters(), model.parameters()):
        s.copy_(p)
    return sampler


def load_prompts(path, tok, args):
    """-> [{"ids", "answer"}]; prompts leaving fewer than max_new_tokens of max_len are dropped (and counted)."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        ids = encode_prompt(tok, prompt)
        answer = data.field(rec, where, "answer", str) if not args.reward_model or "answer" in rec else None
        if len(ids) + args.max_new_tokens > args.max_len:
            n_long += 1
        else:
            recs.append({"ids": ids, "answer": answer})
    return recs, n_long


def main(args):
    rank, world, device = dist.setup(args.seed)
    if args.static_cache not in ("auto", "true", "false"):
        data.fail("--static_cache must be auto|true|false")
    static = args.static_cache == "true" or (args.static_cache == "auto" and device.type == "cuda" and world == 1)
    static_len = args.max_len if static else 0  # positions of the sampling cache (0: a dynamic cache)
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("rl.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)
    if args.model == "runs/sft" and not os.path.exists(args.model):
        data.fail("runs/sft not found: run algos/sft.py first, or pass --model")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        rm_tok = tok
        if args.reward_model:
            rm_tok = AutoTokenizer.from_pretrained(args.reward_model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load the tokenizer of {args.model!r} or {args.reward_model!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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

    def load(name, cls=AutoModelForCausalLM):
        """A model with every dropout off, whatever its config calls it: exact log-probs (deviation 2)."""
        try:
            cfg = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
            for c in (cfg, cfg.get_text_config()):  # attention dropout is often a config rate, not a module
                c.update({k: 0.0 for k, v in c.to_dict().items() if "dropout" in k and isinstance(v, float)})
            m = cls.from_pretrained(name, config=cfg, dtype=torch.float32, attn_implementation=dist.attn_impl(device),
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

    # Reference and reward model: frozen, held for the whole run (the pairs are sampled as it goes).
    ref = load(args.ref_model).eval().requires_grad_(False)
    rm = load(args.reward_model, AutoModelForSequenceClassification).eval() if args.reward_model else None
    if rm is not None and (rm.config.pad_token_id != tok.pad_token_id or tok.pad_token_id == tok.eos_token_id):
        data.fail(f"reward model {args.reward_model!r} needs the tokenizer's pad token {tok.pad_token!r}, "
                  "and one other than EOS (it reads the last non-pad token)")

    # Policy, sharded with FSDP2 when there are several processes; it samples the pairs and learns from them.
    model = load(args.model).eval()  # eval mode changes nothing here (dropout is 0)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
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
        """Generation accuracy on eval_data; {} without it."""
        out = {}
        if eval_recs:
            out["eval/accuracy"] = toy.evaluate(model, tok, eval_recs)
        return out

    @torch.no_grad()
    def rollout(recs, seed):
        """Two samples of each prompt and their rewards -> the pairs whose rewards differ, chosen the higher:
        [((chosen ids, labels), (rejected ids, labels))], labels on the completion tokens (up to EOS) only."""
        torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
        prompt_ids = [r["ids"] for r in recs for _ in range(2)]  # a prompt's samples a, b consecutive
        policy = bf16_sampler(model, sampler) if sampler is not None else model
        comp, mask, ended = generate(policy, prompt_ids[::2], 2, tok, gen_cfg, device, world > 1, static_len)
        comps = [row[:int(n)] for row, n in zip(comp.tolist(), mask.sum(-1).tolist())]
        seqs = [(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompt_ids, comps)]
        if rm is None:  # the verifier: exact match of the final number
            texts = tok.batch_decode(comp, skip_special_tokens=True)
            answers = [r["answer"] for r in recs for _ in range(2)]
            rewards = torch.tensor([toy.verify(t, a) for t, a in zip(texts, answers)], device=device)
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
        return dict(pairs=pairs, tie=[(seqs[0], seqs[1])], rewards=rewards, comp_tokens=mask.sum(), n_tokens=n_tokens)

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
            b = rollout([prompts[j] for j in m.tolist()], args.seed * 10**9 + step * 10**4 + first)
            stats.add({"reward": b["rewards"].sum(), "samples": len(b["rewards"]), "kept": len(b["pairs"]),
                       "completion_tokens": b["comp_tokens"]})
            tokens += b["n_tokens"]
            batches.append(b)
        n_pairs = int(dist.all_sum(sum(len(b["pairs"]) for b in batches)).item())  # M of the equation

        # Update: the DPO loss on the fresh pairs; a step without any pair skips it (deviation 1).
        loss_sum, gnorm, sums = 0.0, 0.0, dist.Sums(device)  # this step's metrics, summed over pairs
        model.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        for i, b in enumerate(batches if n_pairs else []):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            batch = b["pairs"] or b["tie"]  # no pair here: one tie is forwarded, then sliced away (FSDP gathers)
            seqs = [c for c, _ in batch] + [r for _, r in batch]  # chosen and rejected in one forward
            logps, lens = logps_of(model, seqs)
            with torch.no_grad():
                ref_logps = logps_of(ref, seqs)[0]
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
            gnorm = dist.grad_norm(model, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
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
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm, tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **per_pair, **rollout_means, **extra)
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
