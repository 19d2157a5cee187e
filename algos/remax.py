"""ReMax: REINFORCE with the reward of the greedy completion as baseline, no clip and no critic.

Each prompt x gets sampled completions y_i and one greedy completion ŷ (argmax decoding). Samples are
scored by a verifier (exact match of the final answer) minus the KL penalty of the whole completion,
R_i = r_i - β Σ_t k_i,t; the baseline is the verifier reward of the greedy completion, r(x, ŷ), which does
not depend on y_i (the gradient stays unbiased) and needs no value model:

    ∇J(θ) = (1/N) Σ_i (R_i - r(x_i, ŷ_i)) Σ_t ∇θ log πθ(y_i,t | x_i, y_i,<t),   N = Σ_i |y_i|

Reference: Li et al., "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
Large Language Models", arXiv:2310.10505.
Deviations from the paper:
  1. --group_size samples per prompt share its one greedy baseline (the paper: one sample per prompt,
     --group_size 1), so every method of the family sees the same number of samples per step.
  2. The sum over samples is divided by the global completion-token count N (the paper: by the number of
     samples); the gradient direction is the same, and the step no longer grows with completion length.
     --loss_agg sequence averages log-probs over each completion's tokens instead of summing them.
  3. The KL penalty uses the per-token estimator --kl_estimator (k1 by default, the log-ratio), summed over
     the completion and subtracted from the sample's reward only; it is computed from the sampling-time log-probs.
  4. Log-probs are of the tempered policy softmax(logits / T) that sampled (as in TRL), top-p aside.
  5. Sampling is seeded per micro-batch: samples (and the loss) do not depend on the process count.
Data: JSONL, {"prompt": ..., "answer": ...} (prompt: a string or a message list); reward = common.toy.verify.
Run:  python algos/remax.py
      torchrun --nproc_per_node 8 algos/remax.py --model runs/sft --data prompts.jsonl --max_new_tokens 256
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
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig,
                          StaticCache, get_constant_schedule_with_warmup)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.template import encode_prompt  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    ref_model: str = ""  # frozen reference policy of the KL penalty; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    output_dir: str = "runs/remax"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    batch_size: int = 16  # prompts per process per micro-batch (each sampled group_size times)
    grad_accum: int = 1  # micro-batches per optimizer step
    group_size: int = 8  # sampled completions per prompt (plus one greedy completion, the baseline)
    max_new_tokens: int = 12  # completion length limit
    static_cache: str = "auto"  # static KV cache, compiled decode (see generate): true|false|auto (one CUDA process)
    temperature: float = 1.0  # sampling temperature (log-probs are of the tempered policy)
    top_p: float = 1.0  # nucleus sampling
    mask_truncated: bool = False  # completions that hit max_new_tokens without EOS carry no loss (DAPO)
    beta: float = 0.04  # KL coefficient β (0: no reference model is loaded)
    kl_estimator: str = "k1"  # k1 | k2 | k3: per-token KL(πθ ‖ π_ref) estimator, summed into the penalty
    loss_agg: str = "token"  # token: Σ ℓ / global token count | sequence: mean of the per-sequence token means
    share_prompt: str = "auto"  # log-prob forwards compute each prompt once for its group (group_rows): true|false|auto
    # (auto: where it saves compute by sharing_pays' count, from the data's mean prompt length and max_new_tokens)
    lr: float = 2e-4  # learning rate (AdamW), constant after warmup
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 150  # sampled batches (one optimizer step each); 0: --epochs over the prompts
    epochs: int = 1  # passes over the prompts when max_steps is 0
    warmup_ratio: float = 0.0  # fraction of optimizer steps of linear warmup
    seed: int = 0  # seed of the prompt order, the sampling and every RNG
    log_every: int = 1  # steps between metrics lines (each line reports its own step's rollout)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard) or wandb
    eval_every: int = 50  # steps between evaluations (0: only at the start and the end)
    save_every: int = 50  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute


def remax_advantages(rewards_BG, greedy_rewards_B):
    """A_i = R_i - r(x, ŷ): every sample of a prompt (row) minus the reward of that prompt's greedy completion."""
    return rewards_BG - greedy_rewards_B[:, None]


def reinforce_loss(logps_BT, adv_B):
    """Per-token REINFORCE loss -A_i log πθ(y_i,t): its gradient is -A_i ∇θ log πθ,
    summed over tokens by aggregate()."""
    return -adv_B[:, None] * logps_BT


def kl_estimate(logps, ref_logps, kind="k3"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π, with log r = log π_ref - log π:
    k1 = -log r (unbiased), k2 = (log r)²/2 (biased, low variance), k3 = r - 1 - log r (unbiased, ≥ 0)."""
    log_r = ref_logps - logps
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return log_r ** 2 / 2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")


def aggregate(loss_BT, mask_BT, loss_agg, n_global):
    """token: Σ_i Σ_t ℓ / N, N the global completion-token count; sequence: Σ_i (1/|o_i|) Σ_t ℓ / N,
    N the global count of completions with a loss token. A micro-batch without loss tokens contributes exactly 0."""
    if loss_agg == "token":
        return (loss_BT * mask_BT).sum() / max(n_global, 1)
    return ((loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum() / max(n_global, 1)


def token_logps(logits_NV, ids_N, temperature=1.0, chunk=4096):
    """log p(id) = logit[id] - logsumexp(logits) of softmax(logits / T), and the entropy (no grad), in chunks."""
    logps, ents = [], []
    for i in range(0, max(len(ids_N), 1), chunk):
        lg = logits_NV[i:i + chunk].float() / temperature
        lse = torch.logsumexp(lg, -1)
        logps.append(lg.gather(-1, ids_N[i:i + chunk, None]).squeeze(-1) - lse)
        ents.append((lse - (lg.softmax(-1) * lg).sum(-1)).detach())
    return torch.cat(logps), torch.cat(ents)


def group_rows(prompts, comp_NC, G, pad_id, share_prompt=True):
    """-> (ids_BL, pos_BL, mask, keep_K: the positions whose logits predict completion tokens).
    share_prompt: one row per prompt, the prompt once and then its G completions; under the 4D mask completion j
    sees the prompt and its own earlier tokens only, positions continue from the prompt: each completion gets its own
    row's logits, the prompt is computed once, not G times (the dense L x L mask costs more than it saves when
    completions are long beside prompts: see sharing_pays)."""
    C, dev, W = comp_NC.shape[1], comp_NC.device, max(map(len, prompts))
    lens_B = torch.tensor([len(p) for p in prompts], device=dev)
    pad_BW = torch.arange(W, device=dev) < W - lens_B[:, None]
    prompt_BW = torch.tensor([[pad_id] * (W - len(p)) + p for p in prompts], device=dev)
    if not share_prompt:  # one left-padded row per completion, a 2D padding mask
        attn_NL = torch.cat([(~pad_BW).long().repeat_interleave(G, 0), torch.ones_like(comp_NC)], 1)
        ids_NL = torch.cat([prompt_BW.repeat_interleave(G, 0), comp_NC], 1)
        pos_NL = (attn_NL.cumsum(-1) - 1).clamp(min=0)
        return ids_NL, pos_NL, attn_NL, torch.arange(W - 1, W + C - 1, device=dev)
    B = len(prompts)
    ids_BL = torch.cat([prompt_BW, comp_NC.reshape(B, G * C)], 1)
    comp_seg_BGC = torch.arange(1, G + 1, device=dev).repeat_interleave(C).expand(B, -1)
    seg_BL = torch.cat([torch.where(pad_BW, -1, 0), comp_seg_BGC], 1)  # -1: padding, 0: prompt, j: completion j
    prompt_pos_BW = (torch.arange(W, device=dev) - (W - lens_B[:, None])).clamp(min=0)
    comp_pos_BGC = lens_B[:, None] + torch.arange(C, device=dev).repeat(G)
    pos_BL = torch.cat([prompt_pos_BW, comp_pos_BGC], 1)
    causal_LL = torch.ones(W + G * C, W + G * C, dtype=torch.bool, device=dev).tril()
    key_seg, query_seg = seg_BL[:, None, :], seg_BL[:, :, None]
    mask_BLL = causal_LL & ((key_seg == 0) | (key_seg == query_seg))  # key in the prompt, or in the query's segment
    keep_K = W + torch.arange(G * C, device=dev) - 1
    keep_K[::C] = W - 1  # token 0 of every completion is predicted by the last prompt token
    return ids_BL, pos_BL, mask_BLL[:, None], keep_K

def sharing_pays(cfg, W, C, G):
    """Whether group_rows' shared-prompt layout should take less compute than a row per completion, by forward FLOPs:
    a token costs 2p through a layer's weights (p: their count) and a (query, key) pair 4d in its attention (d: the
    query width), every pair of a masked row counted (sdpa computes the masked pairs too). Sharing computes each
    prompt (W tokens) once instead of G times, but attends over rows of G completions (C tokens each): it pays where
    prompts are long beside completions. On a CPU the count matched the measured time within about 20% (README), so
    sharing must save a fifth by it."""
    cfg = cfg.get_text_config()
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    d, d_kv = heads * head_dim, (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    p = 2 * h * d + 2 * h * d_kv + 3 * h * (getattr(cfg, "intermediate_size", None) or 4 * h)  # q o k v, gated MLP
    pair = 4 * d / (2 * p)  # a (query, key) pair's cost, in tokens' costs
    shared, own = W + G * C, W + C
    return shared + pair * shared ** 2 < 0.8 * G * (own + pair * own ** 2)


def completion_logps(model, rows, C, temperature, device):
    """Log-probs and entropies (N, C) of the completion tokens laid out by group_rows, in one forward without cache."""
    ids_BL, pos_BL, mask, keep_K = rows
    with dist.autocast(device):
        out = model(input_ids=ids_BL, attention_mask=mask, position_ids=pos_BL, use_cache=False, logits_to_keep=keep_K)
    logits_NV = out.logits.reshape(-1, out.logits.shape[-1])
    logps, ents = token_logps(logits_NV, ids_BL[:, -len(keep_K):].reshape(-1), temperature)
    return logps.view(-1, C), ents.view(-1, C)


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
    """-> [(prompt ids, answer)]; prompts leaving fewer than max_new_tokens of max_len are dropped (and counted)."""
    recs, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        prompt = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        ids = encode_prompt(tok, prompt)
        answer = data.field(rec, where, "answer", str)
        if len(ids) + args.max_new_tokens > args.max_len:
            n_long += 1
        else:
            recs.append({"ids": ids, "prompt": rec["prompt"], "answer": answer})
    return recs, n_long


def distinct2(comps):
    """Distinct bigrams over all bigrams of one group's completions (1: all different, low: mode collapse)."""
    grams = [tuple(c[j:j + 2]) for c in comps for j in range(len(c) - 1)]
    return len(set(grams)) / max(len(grams), 1)


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
    if args.kl_estimator not in ("k1", "k2", "k3") or args.loss_agg not in ("token", "sequence"):
        data.fail("--kl_estimator must be k1|k2|k3, --loss_agg token|sequence")
    if args.group_size < 1:
        data.fail("--group_size must be at least 1")
    if args.share_prompt not in ("auto", "true", "false"):
        data.fail("--share_prompt must be auto|true|false")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        data.fail(f"cannot load tokenizer {args.model!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts, n_long = load_prompts(args.data, tok, args)
    eval_prompts = load_prompts(args.eval_data, tok, args)[0] if args.eval_data else []
    eval_recs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in eval_prompts]
    say(f"{len(prompts)} prompts; {n_long} longer than max_len={args.max_len} - max_new_tokens were dropped")
    P = args.batch_size * args.grad_accum * world  # prompts per step
    if len(prompts) < P:
        data.fail(f"{args.data}: {len(prompts)} prompts, fewer than one global batch of {P}")
    steps_per_epoch = len(prompts) // P
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Models: the policy, and a frozen reference when β > 0. Dropout is off: every dropout rate is 0 and forwards run
    # in eval mode (the update in train mode under --gradient_checkpointing, the same function as dropout is 0), so
    # old, current and reference log-probs compare the same deterministic function (TRL #744).
    share = None if args.share_prompt == "auto" else args.share_prompt == "true"  # auto: decided as the policy loads

    def load(path):  # the shared-prompt layout's 4D mask needs sdpa: flash-attn's varlen kernels cannot express it
        nonlocal share
        try:
            cfg = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
            if share is None:  # the policy's config, the first loaded
                W = sum(len(r["ids"]) for r in prompts) / len(prompts)
                share = sharing_pays(cfg, W, args.max_new_tokens, args.group_size)
                say(f"--share_prompt auto: {share} (mean prompt {W:.0f} tokens, {args.max_new_tokens} new tokens)")
            attn_impl = "sdpa" if share else dist.attn_impl(device)
            for c in (cfg, cfg.get_text_config()):  # attention dropout is often a config rate, not a module
                c.update({k: 0.0 for k, v in c.to_dict().items() if "dropout" in k and isinstance(v, float)})
            m = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32,
                                                     attn_implementation=attn_impl,
                                                     trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            data.fail(f"cannot load model {path!r}: {str(e).splitlines()[0]}")
        n_embed = m.get_input_embeddings().num_embeddings
        if len(tok) > n_embed:
            data.fail(f"tokenizer has {len(tok)} tokens but model {path!r} embeds only {n_embed}")
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        return dist.shard(m, world, device).eval()

    model = load(args.model)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    ref = load(args.ref_model).requires_grad_(False) if args.beta > 0 else None
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
    greedy_cfg = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")  # one kernel for the whole update on CUDA
    sched = get_constant_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps))

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt = os.path.join(args.output_dir, "checkpoint")
    start = dist.load_checkpoint(ckpt, model, opt, sched, rank) if args.resume else 0
    if rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    metrics = data.Metrics(args.output_dir, rank == 0, resume_step=start, report_to=args.report_to, config=asdict(args))
    if start:
        say(f"resumed from {ckpt} at step {start}")

    def rollout(recs, seed):
        """G samples per prompt, their rewards, the reference log-probs and the greedy baseline, without gradients.
        The sampling policy's own log-probs come from the first update pass (on-policy): no forward of their own."""
        torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
        prompt_ids = [r["ids"] for r in recs]
        t_gen = time.time()
        policy = bf16_sampler(model, sampler) if sampler is not None else model
        comp, mask, ended = generate(policy, prompt_ids, args.group_size, tok, gen_cfg, device, world > 1, static_len)
        texts = tok.batch_decode(comp, skip_special_tokens=True)  # on the host: the sampling has finished
        timing["generate"] += time.time() - t_gen
        answers = [r["answer"] for r in recs for _ in range(args.group_size)]
        rewards = torch.tensor([toy.verify(t, a) for t, a in zip(texts, answers)], device=device)
        rows = group_rows(prompt_ids, comp, args.group_size, tok.pad_token_id, share)
        C = comp.shape[1]
        with torch.no_grad():
            ref_logps = completion_logps(ref, rows, C, args.temperature, device)[0] if ref is not None else None
        if args.mask_truncated:
            mask = mask & ended[:, None]
        n_tokens = sum(map(len, prompt_ids)) * args.group_size + mask.sum().item()
        # ŷ: one greedy completion per prompt
        greedy_comp, _, _ = generate(policy, prompt_ids, 1, tok, greedy_cfg, device, world > 1, static_len)
        greedy_texts = tok.batch_decode(greedy_comp, skip_special_tokens=True)
        greedy = torch.tensor([toy.verify(t, r["answer"]) for t, r in zip(greedy_texts, recs)], device=device)
        return dict(rows=rows, comp=comp, C=C, mask=mask.float(), rewards=rewards, ref_logps=ref_logps,
                    n_tokens=n_tokens, greedy=greedy)

    def evaluate():  # without an eval set: {}, and the metrics line has no eval keys
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)} if args.eval_data else {}

    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="remax")
    t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        epoch_rng = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(prompts), generator=epoch_rng, device="cpu")
        idx = order[k * P:(k + 1) * P]
        batches = []
        for g in [i * world + rank for i in range(args.grad_accum)]:  # this process's micro-batches of the step
            recs = [prompts[j] for j in idx[g * args.batch_size:(g + 1) * args.batch_size].tolist()]
            batches.append(rollout(recs, args.seed * 10**9 + step * 10**4 + g))

        # Rollout statistics: named sums over this step's micro-batches, reduced over processes at the log line.
        sums = dist.Sums(device)
        for b in batches:
            r_BG = b["rewards"].view(-1, args.group_size)
            comps = [row[:int(n)] for row, n in zip(b["comp"].tolist(), b["mask"].sum(-1).tolist())]
            groups = [comps[j:j + args.group_size] for j in range(0, len(comps), args.group_size)]
            sums.add({"reward": r_BG.sum(), "reward_sq": (r_BG ** 2).sum(), "samples": r_BG.numel(),
                      "zero_std_groups": (r_BG.amax(-1) == r_BG.amin(-1)).sum(), "groups": len(r_BG),
                      "completion_tokens": b["mask"].sum(), "distinct2": sum(distinct2(c) for c in groups)})
            tokens += b["n_tokens"]
        if args.loss_agg == "token":  # N: the global count of completion tokens ...
            n_local = sum(b["mask"].sum() for b in batches)
        else:  # ... or of completions with a loss token
            n_local = sum((b["mask"].sum(-1) > 0).sum() for b in batches)
        n_global = dist.all_sum(n_local).item()

        # Update: one on-policy optimizer step over all micro-batches (REINFORCE needs samples of the current policy).
        model.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        loss_sum = 0.0
        for i, b in enumerate(batches):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            logps, ents = completion_logps(model, b["rows"], b["C"], args.temperature, device)
            # on-policy: these are the sampling policy's log-probs; rewards -> advantages, group by group
            b["old_logps"] = logps.detach()
            score_B = b["rewards"].clone()
            if ref is not None:
                kl_BC = kl_estimate(b["old_logps"], b["ref_logps"], args.kl_estimator)
                score_B = score_B - args.beta * (kl_BC * b["mask"]).sum(-1)  # R_i = r_i - β Σ_t k_i,t
                k3_BC = kl_estimate(b["old_logps"], b["ref_logps"], "k3")
                sums.add({"kl": (k3_BC * b["mask"]).sum()})
            b["adv"] = remax_advantages(score_B.view(-1, args.group_size), b["greedy"]).view(-1)
            sums.add({"entropy": (ents * b["mask"]).sum()})
            loss_BT = reinforce_loss(logps, b["adv"])
            loss = aggregate(loss_BT, b["mask"], args.loss_agg, n_global)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.item()
        if not math.isfinite(dist.all_sum(loss_sum).item()):
            data.fail(f"non-finite loss at step {step + 1}; stopping without saving a model")
        gnorm = dist.grad_norm(model, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_step = dist.all_sum(loss_sum).item()
        timing["steps"] += 1
        model.eval()  # rollouts and evaluation generate with the KV cache, which train mode would drop

        # Log: this step's rollout and update, over the global batch.
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            s = sums.reduce()
            seconds = time.time() - t_log
            tps = dist.all_sum(tokens).item() / seconds
            n_resp = max(s["completion_tokens"], 1)  # completion tokens of the rollout
            mean = s["reward"] / s["samples"]
            std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
            extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == total_steps else {}
            kl = {"kl": s["kl"] / n_resp} if ref is not None else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm, tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                        frac_zero_std=s["zero_std_groups"] / s["groups"], **kl, entropy=s["entropy"] / n_resp,
                        response_length=s["completion_tokens"] / s["samples"], distinct2=s["distinct2"] / s["groups"],
                        step_s=seconds / timing["steps"], generate_s=timing["generate"] / timing["steps"], **extra)
            t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            dist.save_checkpoint(ckpt, model, opt, sched, done, rank)
    dist.save_model(model, tok, args.output_dir, rank)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
