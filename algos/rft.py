"""RFT: rejection-sampling fine-tuning (best-of-n SFT), round after round from the current policy.

Each round samples n completions for every prompt of the round from the current policy, scores each by a verifier
(exact match of the final answer) or a reward model, keeps for each prompt its best completion(s) when they reach
--min_reward, and fine-tunes the policy on the kept (prompt, completion) pairs with the SFT loss (completion tokens
only, over the global token count); the next round samples from the updated policy:

    L(θ) = -(1/N) Σ_{(x,y) ∈ D} Σ_t log πθ(y_t | x, y_<t),   N = Σ_{(x,y) ∈ D} |y|
    D = {(x, y_j) : r(x, y_j) = max_i r(x, y_i) ≥ r_min},   y_1..y_n ~ π_old(· | x)

Ties: all distinct completions (by text) that share a prompt's best reward qualify; the first --keep_per_prompt of
them in sample order are kept (1: one, the first sampled). Identical (prompt, text) pairs are kept once, also when a
prompt occurs twice in a round.
Reference: Yuan et al., "Scaling Relationship on Learning Mathematical Reasoning with Large Language Models",
arXiv:2308.01825 (RFT); Llama 2, arXiv:2307.09288 (§3.2.3, rejection sampling). Deviations from the papers:
  1. Iterated on-policy (Llama 2, expert iteration): each round samples from the policy the last round trained and
     fine-tunes it further on that round's kept set alone. Yuan et al. sample once from the SFT model and train the
     pretrained model on the SFT data plus all distinct correct paths (deduplicated by their equations, not text).
  2. A completion cut at --max_new_tokens (no end-of-turn token) is never kept: it would teach not to stop.
  3. Training sequences are the prompt ids and the sampled ids up to and including the end-of-turn token, as
     sft.py's chat template renders them (without its trailing newline), not the decoded text re-tokenized.
  4. Sampling is seeded per chunk of prompts and every process gathers all samples (all_sum), so the kept set and
     the training batches, hence the losses, do not depend on the process count. The last batch of a round is
     filled from a further shuffled pass over the kept set, so every step has a full global batch.
Data: JSONL, {"prompt": ..., "answer": ...} (prompt: a string or a message list); reward = common.toy.verify, or
the score of --reward_model (a sequence-classification model, rm.py; "answer" is then optional).
Run:  python algos/rft.py
      torchrun --nproc_per_node 8 algos/rft.py --model runs/sft --data prompts.jsonl --max_new_tokens 256
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DynamicCache,
                          GenerationConfig, StaticCache, get_constant_schedule)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.packing import pad  # noqa: E402
from common.template import IGNORE, encode_prompt  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    reward_model: str = ""  # sequence-classification reward model (rm.py); default: the verifier on "answer"
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    output_dir: str = "runs/rft"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    rounds: int = 6  # sample -> select -> fine-tune rounds
    prompts_per_round: int = 256  # prompts sampled per round over all processes (a multiple of gen_batch_size x procs)
    num_samples: int = 8  # n: completions sampled per prompt
    gen_batch_size: int = 64  # prompts per process per generate call (each sampled num_samples times)
    max_new_tokens: int = 12  # completion length limit
    static_cache: str = "auto"  # static KV cache, compiled decode (see generate): true|false|auto (one CUDA process)
    temperature: float = 1.0  # sampling temperature (the loss is the plain log-likelihood, at temperature 1)
    top_p: float = 1.0  # nucleus sampling
    min_reward: float = 1.0  # r_min: a prompt whose best reward is below it keeps nothing (verifier: correct only)
    keep_per_prompt: int = 1  # at most this many distinct completions tied at the best reward, first sampled first
    epochs_per_round: int = 1  # passes over the round's kept set
    steps_per_round: int = 0  # optimizer steps per round instead of epochs_per_round passes (0: passes)
    batch_size: int = 16  # kept sequences per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # learning rate (AdamW), constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # seed of the prompt order, the sampling and every RNG
    eval_every: int = 1  # rounds between evaluations (0: only at the start and the end)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard) or wandb
    save_every: int = 0  # rounds between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    loss_chunk: int = -1  # millions of vocabulary-wide logits held at once; 0: full logits; -1: 128 on GPU, 0 on CPU


def select_best(prompts_ids, texts, rewards, min_reward, keep=1):
    """Indices (in sample order) of the samples to train on, one entry per sample: its prompt's ids, its decoded
    text, its reward. Samples are grouped by prompt ids; a group keeps the first `keep` distinct texts, in sample
    order, whose reward equals the group's best r*, provided r* ≥ min_reward. A reward of -inf is never kept."""
    best = {}
    for p, r in zip(prompts_ids, rewards):
        best[tuple(p)] = max(best.get(tuple(p), -math.inf), r)  # r* of each prompt
    kept, seen, count = [], set(), {}
    for i, (p, text, r) in enumerate(zip(prompts_ids, texts, rewards)):
        key = tuple(p)
        best_enough = r == best[key] and r >= min_reward and r > -math.inf
        if best_enough and (key, text) not in seen and count.get(key, 0) < keep:
            kept.append(i)
            seen.add((key, text))
            count[key] = count.get(key, 0) + 1
    return kept


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
def rm_scores(rm, prompts, comp_NC, mask_NC, G, pad_id, device):
    """r_ψ(x, y) of each completion: its left-padded prompt and its tokens up to the end-of-turn token, read by the
    reward model's head at the last non-pad token (where rm.py trained it to read)."""
    width = max(map(len, prompts))
    lens_N = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(G)
    prompt_NW = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device).repeat_interleave(G, 0)
    ids = torch.cat([prompt_NW, torch.where(mask_NC, comp_NC, pad_id)], 1)
    attn = torch.cat([(torch.arange(width, device=device) >= width - lens_N[:, None]).long(), mask_NC.long()], 1)
    with dist.autocast(device):
        out = rm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    return out.logits[:, 0].float()


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


def load_prompts(path, tok, args, need_answer=True):
    """-> [(prompt ids, answer)]; prompts leaving fewer than max_new_tokens of max_len are dropped (and counted)."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        ids = encode_prompt(tok, prompt)
        answer = data.field(rec, where, "answer", str) if need_answer or "answer" in rec else None
        if len(ids) + args.max_new_tokens > args.max_len:
            n_long += 1
        else:
            recs.append({"ids": ids, "prompt": rec["prompt"], "answer": answer})
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
    say = tqdm.write if rank == 0 else (lambda *_: None)
    if args.model == "runs/sft" and not os.path.exists(args.model):
        data.fail("runs/sft not found: run algos/sft.py first, or pass --model")
    for name in ("prompts_per_round", "gen_batch_size", "keep_per_prompt", "epochs_per_round", "steps_per_round"):
        least = int(name != "steps_per_round")
        if getattr(args, name) < least:
            data.fail(f"--{name} must be {'positive' if least else 'non-negative'}, got {getattr(args, name)}")
    per_call = args.gen_batch_size * world  # prompts per generate call of all processes (each runs as many calls)
    if args.prompts_per_round % per_call:
        data.fail(f"--prompts_per_round must be a multiple of gen_batch_size x processes = {per_call}")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load tokenizer {args.model!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts, n_long = load_prompts(args.data, tok, args, need_answer=not args.reward_model)
    eval_prompts = load_prompts(args.eval_data, tok, args)[0] if args.eval_data else []
    eval_recs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in eval_prompts]
    say(f"{len(prompts)} prompts; {n_long} longer than max_len={args.max_len} - max_new_tokens were dropped")
    P, n = args.prompts_per_round, args.num_samples
    if len(prompts) < P:
        data.fail(f"{args.data}: {len(prompts)} prompts, fewer than one round of {P}")
    rounds_per_epoch = len(prompts) // P

    # Models: the policy, and the frozen reward model when one is given (else the verifier scores).
    def load(cls, path):
        try:
            m = cls.from_pretrained(path, dtype=torch.float32, attn_implementation=dist.attn_impl(device),
                                    trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            data.fail(f"cannot load model {path!r}: {str(e).splitlines()[0]}")
        n_embed = m.get_input_embeddings().num_embeddings
        if len(tok) > n_embed:
            data.fail(f"tokenizer has {len(tok)} tokens but model {path!r} embeds only {n_embed}")
        return dist.shard(m, world, device)

    model = load(AutoModelForCausalLM, args.model)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    rm = load(AutoModelForSequenceClassification, args.reward_model).eval() if args.reward_model else None
    if rm is not None:
        rm.requires_grad_(False)
        try:
            rm_tok = AutoTokenizer.from_pretrained(args.reward_model, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            data.fail(f"cannot load tokenizer {args.reward_model!r}: {str(e).splitlines()[0]}")
        if rm_tok.get_vocab() != tok.get_vocab():  # it must read the sampled ids
            data.fail(f"reward model {args.reward_model!r} has another tokenizer than {args.model!r}")
        if rm.config.pad_token_id != tok.pad_token_id or tok.pad_token_id == tok.eos_token_id:  # it pools the last
            data.fail(f"reward model {args.reward_model!r} needs the tokenizer's pad token {tok.pad_token!r}, "
                      "and one other than EOS")  # non-pad token
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")  # one kernel for the whole update on CUDA
    sched = get_constant_schedule(opt)

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt = os.path.join(args.output_dir, "checkpoint")
    start = dist.load_checkpoint(ckpt, model, opt, sched, rank) if args.resume else 0
    if rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    metrics = data.Metrics(args.output_dir, rank == 0, resume_step=start, report_to=args.report_to, config=asdict(args))
    if start:
        say(f"resumed from {ckpt} at round {start}")

    def evaluate():  # without an eval set: {}, and the metrics line has no eval keys
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)} if args.eval_data else {}

    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, args.rounds), initial=start, total=args.rounds, disable=rank != 0, desc="rft")
    t_log, tokens = time.time(), 0.0
    for rnd in bar:
        epoch, k = divmod(rnd, rounds_per_epoch)
        epoch_rng = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(prompts), generator=epoch_rng, device="cpu")
        idx = order[k * P:(k + 1) * P].tolist()

        # Sample: this process's chunks of the round's prompts, n samples each, scored; then every process gathers
        # all samples (ids + 1, 0 past the end of each completion), so selection below is the same everywhere.
        model.eval()
        policy = bf16_sampler(model, sampler) if sampler is not None else model
        sums = dist.Sums(device)
        n_chunks = P // args.gen_batch_size
        comp_table = torch.zeros(P * n, args.max_new_tokens, dtype=torch.long, device=device)
        reward_table, ended_table = torch.zeros(P * n, device=device), torch.zeros(P * n, device=device)
        for g in range(rank, n_chunks, world):
            recs = [prompts[j] for j in idx[g * args.gen_batch_size:(g + 1) * args.gen_batch_size]]
            torch.manual_seed(args.seed * 10**9 + rnd * 10**4 + g)  # samples depend on (round, chunk) only
            prompt_ids = [r["ids"] for r in recs]
            comp, mask, ended = generate(policy, prompt_ids, n, tok, gen_cfg, device, world > 1, static_len)
            if rm is not None:
                rewards = rm_scores(rm, prompt_ids, comp, mask, n, tok.pad_token_id, device)
            else:
                texts = tok.batch_decode(comp, skip_special_tokens=True)
                answers = [r["answer"] for r in recs for _ in range(n)]
                rewards = torch.tensor([toy.verify(t, a) for t, a in zip(texts, answers)], device=device)
            rows = slice(g * args.gen_batch_size * n, (g + 1) * args.gen_batch_size * n)
            comp_table[rows, :comp.shape[1]] = (comp + 1) * mask
            reward_table[rows], ended_table[rows] = rewards, ended.float()
            sums.add({"reward": rewards.sum(), "reward_sq": (rewards ** 2).sum(), "samples": len(rewards),
                      "completion_tokens": mask.sum(), "truncated": (~ended).sum()})
            tokens += sum(map(len, prompt_ids)) * n + mask.sum().item()
        comp_table = dist.all_sum(comp_table).long()
        rewards = dist.all_sum(reward_table).tolist()
        ended = dist.all_sum(ended_table).bool().tolist()

        # Select: per prompt, the best completion(s) with r ≥ r_min, never one cut at max_new_tokens (deviation 2).
        comps = [[t - 1 for t in row if t > 0] for row in comp_table.tolist()]
        texts = tok.batch_decode(comps, skip_special_tokens=True)
        sample_prompts = [prompts[j]["ids"] for j in idx for _ in range(n)]
        eligible = [r if e else -math.inf for r, e in zip(rewards, ended)]
        kept = select_best(sample_prompts, texts, eligible, args.min_reward, args.keep_per_prompt)
        docs = [(sample_prompts[i] + comps[i], [IGNORE] * len(sample_prompts[i]) + comps[i]) for i in kept]
        n_kept_prompts = len({tuple(sample_prompts[i]) for i in kept})

        # Fine-tune: SFT on the kept set, a global batch of batch_size x grad_accum x processes sequences a step.
        model.train()
        GB = args.batch_size * args.grad_accum * world
        n_steps = (args.steps_per_round or -(-args.epochs_per_round * len(docs) // GB)) if docs else 0
        train_rng = torch.Generator().manual_seed(args.seed * 10**9 + rnd * 10**4 + n_chunks)  # after the chunks
        passes = -(-n_steps * GB // max(len(docs), 1))  # shuffled passes over the kept set, back to back
        perms = [torch.randperm(len(docs), generator=train_rng, device="cpu").tolist() for _ in range(passes)]
        stream = [i for perm in perms for i in perm]
        losses, gnorm = [], 0.0
        for step in range(n_steps):
            idx_step = stream[step * GB:(step + 1) * GB]
            starts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]  # this process's share
            micro = [idx_step[j:j + args.batch_size] for j in starts]
            # right-padded (prompt + completion) rows, labels on the completion; built and kept on the CPU, where
            # label_logps reads the labels, and the forward's inputs copied over
            batches = [pad([docs[i] for i in m], tok.pad_token_id) for m in micro]
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            n_tokens = dist.all_sum(n_labels).item()  # N of the equation: completion tokens of the global batch
            loss_sum = 0.0
            for i, b in enumerate(batches):
                if world > 1:
                    model.set_requires_gradient_sync(i == len(batches) - 1)
                fwd = {k: dist.to_device(b[k], device) for k in ("input_ids", "attention_mask")}
                with dist.autocast(device):
                    logps = label_logps(model, fwd, b["labels"], dist.logits_budget(args.loss_chunk, device))
                loss = -logps.sum() / max(n_tokens, 1)  # sft_loss, from the labelled positions' log-probabilities
                (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
                loss_sum += loss.item()
                tokens += b["attention_mask"].sum().item()
            loss_step = dist.all_sum(loss_sum).item()
            if not math.isfinite(loss_step):
                data.fail(f"non-finite loss {loss_step} at round {rnd + 1}; stopping without saving a model")
            gnorm = dist.grad_norm(model, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_step)

        # Log: this round's samples, kept set and updates, over all processes.
        done = rnd + 1
        s = sums.reduce()
        mean = s["reward"] / s["samples"]
        std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
        tps = dist.all_sum(tokens).item() / (time.time() - t_log)
        extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == args.rounds else {}
        trained = {"loss": sum(losses) / n_steps, "grad_norm": gnorm} if n_steps else {}
        if not docs:
            say(f"round {done}: no prompt's best sample reached min_reward={args.min_reward}; nothing trained")
        metrics.log(done, **trained, steps=n_steps, lr=sched.get_last_lr()[0], tokens_per_s=tps,
                    peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                    kept=len(docs), kept_frac=n_kept_prompts / len(set(map(tuple, sample_prompts))),
                    response_length=s["completion_tokens"] / s["samples"], truncated_frac=s["truncated"] / s["samples"],
                    **extra)
        t_log, tokens = time.time(), 0.0
        if args.save_every and done % args.save_every == 0 and done < args.rounds:
            dist.save_checkpoint(ckpt, model, opt, sched, done, rank)
    dist.save_model(model, tok, args.output_dir, rank)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
