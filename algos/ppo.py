"""PPO against a learned reward model (RLHF) or a verifier: actor, critic, frozen reference and reward.

The actor (from SFT) samples completions; the reward model (from rm.py) scores each at its end-of-turn
token (--reward verifier: 1 when the completion's final number is the record's answer, else 0, the reward
GRPO, RLOO and ReMax use); a per-token KL penalty keeps the actor near the frozen reference. A token-level
critic (initialised from the RM; with the verifier, from the SFT model with a new zero value head) is the
baseline of generalised advantage estimation; actor and critic take clipped PPO steps:

    L(θ,φ) = Ê_t[max(-Â_t ρ_t, -Â_t clip(ρ_t, 1-ε, 1+ε))]
             + c_v Ê_t[½ max((V_φ-R_t)², (V_old+clip(V_φ-V_old, ±ε_v)-R_t)²)] - c_H Ê_t[H_t]
    ρ_t = πθ(y_t|s_t)/π_old(y_t|s_t),  r_t = -β KL_t + [t=T] r(x,y)  (r_ψ or the verifier),
    δ_t = r_t + γ V_old(s_t+1) - V_old(s_t),  Â_t = Σ_l (γλ)^l δ_t+l (then whitened),  R_t = Â_t + V_old(s_t),
    Ê_t = mean over the completion tokens of the global (mini)batch

Reference: InstructGPT, arXiv:2203.02155 (§3.5); PPO, arXiv:1707.06347; GAE, arXiv:1506.02438;
adaptive KL controller: Ziegler et al., arXiv:1909.08593. Deviations from the paper:
  1. No pretraining-mix term (PPO-ptx): the KL to the reference is the only anchor.
  2. Advantages are whitened over the completion tokens of the global batch (common, not in the paper).
     KL_t is the k1 (default), k2 or k3 estimator of log π_old/π_ref; --kl_placement loss moves β·KL_t
     from the reward into the loss (there k3's gradient is biased: verl PR #2953).
  3. Log-probs are of the temperature-scaled logits (the sampled distribution); top-p is ignored in them.
  4. A completion cut at --max_new_tokens has no end-of-turn token, the position the RM was trained to
     read: one is appended before scoring and --missing_eos_penalty is subtracted (--mask_truncated: no loss).
  5. The critic is the RM's backbone with its bias-free score head applied at every position, so V
     starts as the RM's reading of each prefix. Dropout is off in all four models (TRL #744): every rate is 0
     and they run in eval mode (the update in train mode under --gradient_checkpointing: the same function).
  6. Each process splits its own rollout into minibatches, as TRL and OpenRLHF do, so a run's samples and
     updates depend on the process count (grpo, rloo and remax seed each micro-batch and do not).
Data: JSONL, {"prompt": ..., "answer": ...}; with the RM, the optional answer only feeds the gold (verifier)
score logged beside the RM score, so that reward over-optimisation shows; with the verifier it is the reward, or
with --reward verifier --reward_fn the weighted sum of your functions of the completion and its record is
(common/rewards.py; "answer" then optional, and gold where given).
Run:  python algos/ppo.py
      torchrun --nproc_per_node 8 algos/ppo.py --model sft_out --reward_model rm_out --data prompts.jsonl
      python algos/ppo.py --reward verifier   # the same reward as grpo.py, for a comparison on equal terms
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, GenerationConfig,
                          StaticCache, get_constant_schedule_with_warmup)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import logps_entropy  # noqa: E402
from common.models import load_model, load_tokenizer, start_run  # noqa: E402
from common.rewards import load_rewards, reward  # noqa: E402
from common.sampling import bf16_sampler, distinct2, rm_scores  # noqa: E402
from common.template import IGNORE, encode_prompt, encode_response  # noqa: E402


@dataclass
class Args:
    reward: Literal["model", "verifier"] = "model"  # model: the RM's score (RLHF) | verifier: match of the final number
    reward_fn: list[str] = field(default_factory=list)  # with --reward verifier: FILE.py:NAME[:WEIGHT], repeatable
    reward_model: str = "runs/rm"  # reward model from rm.py, also the critic's initialisation (--reward model)
    group_size: int = 1  # completions sampled per prompt
    num_minibatches: int = 4  # optimizer steps per PPO epoch: the rollout is split into this many
    ppo_epochs: int = 4  # passes over each rollout
    beta: float = 0.2  # KL coefficient β (the controller's starting value with --adaptive_kl)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # estimator of KL_t from log π_old - log π_ref
    kl_placement: Literal["reward", "loss"] = "reward"  # reward: r_t = -β KL_t (InstructGPT); loss: + β Ê_t[KL_t]
    adaptive_kl: bool = False  # adapt β towards --kl_target (Ziegler et al.'s proportional controller)
    kl_target: float = 1.0  # target sequence KL of the controller (nats)
    kl_horizon: int = 10000  # controller horizon (samples)
    gamma: float = 1.0  # discount γ
    lam: float = 0.95  # GAE λ
    clip_eps: float = 0.2  # ε of the policy ratio clip
    vf_clip: float = 0.2  # ε_v of the value clip
    vf_coef: float = 0.1  # c_v
    ent_coef: float = 0.0  # c_H, entropy bonus
    target_kl: float = 0.0  # stop the rollout's updates when a minibatch's approx KL(π_old‖πθ) exceeds it (0: off)
    critic_lr: float = 3e-4  # critic learning rate
    mask_truncated: bool = False  # completions without an end-of-turn token carry no loss
    missing_eos_penalty: float = 1.0  # subtracted from the RM score of a completion without end-of-turn token
    model: str = "runs/sft"  # the actor's starting point (path or hub name); default: the SFT output
    ref_model: str = ""  # frozen reference of the KL penalty; default: --model
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    output_dir: str = "runs/ppo"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 256  # prompts longer than max_len - max_new_tokens are dropped (and counted)
    batch_size: int = 64  # prompts per process per rollout
    grad_accum: int = 1  # micro-batches per minibatch
    max_new_tokens: int = 12  # completion length limit
    temperature: float = 1.0  # sampling temperature (log-probs use the same scaled logits)
    top_p: float = 1.0  # nucleus sampling
    lr: float = 1e-4  # actor learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping, actor and critic separately
    max_steps: int = 100  # rollouts; 0: --epochs passes over the prompts
    epochs: int = 1  # passes over the prompts when max_steps is 0
    warmup_ratio: float = 0.0  # fraction of steps of linear warmup, then a constant rate
    seed: int = 0  # seed of the prompt order and of every RNG
    log_every: int = 1  # steps between metrics lines (each line reports its own step's rollout)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 25  # steps between evaluations (0: only at the end)
    save_every: int = 50  # steps between resumable checkpoints (0: none)
    resume: bool = False  # continue from output_dir/checkpoint when it exists
    trust_remote_code: bool = False  # allow model code from the hub to run
    # LoRA (peft, arXiv:2106.09685): low-rank adapters train, the model's own weights stay frozen
    lora_r: int = 0  # rank of the adapters; 0: full fine-tuning, every parameter trains
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_r
    lora_targets: str = "all-linear"  # comma-separated module names; all-linear: every linear layer but the head
    merge_lora: bool = False  # also save the merged model (base + adapters folded in) in output_dir/merged
    # Speed and memory: none of these changes the loss
    static_cache: Literal["auto", "true", "false"] = "auto"  # fixed-size KV cache, compiled decode; auto: 1 CUDA proc
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute


def kl_estimate(logps, ref_logps, kind="k3"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π, with log r = log π_ref - log π:
    k1 = -log r (unbiased), k2 = (log r)²/2 (biased, low variance), k3 = r - 1 - log r (unbiased, ≥ 0)."""
    log_r = ref_logps - logps
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return log_r ** 2 / 2
    return torch.exp(log_r) - 1 - log_r  # k3


def token_rewards(scores_B, kl_BT, mask_BT, beta):
    """r_t = -β KL_t on every completion token, plus the reward model's score on the last one."""
    rewards = -beta * kl_BT * mask_BT
    last = (mask_BT.sum(1) - 1).clamp(min=0)  # index of the last completion token (end-of-turn)
    return rewards.scatter_add(1, last[:, None], (scores_B * mask_BT.any(1))[:, None])


def gae(rewards_BT, values_BT, mask_BT, gamma, lam):
    """Â_t = Σ_{s≥t} (γλ)^(s-t) δ_s with δ_t = r_t + γ V(s_t+1) - V(s_t) and V = 0 past the last token;
    the backward recursion Â_t = δ_t + γλ Â_t+1 as one triangular matmul. -> (advantages, returns Â + V)."""
    m = mask_BT.float()
    next_values = torch.cat([values_BT[:, 1:] * m[:, 1:], torch.zeros_like(values_BT[:, :1])], 1)
    delta = (rewards_BT + gamma * next_values - values_BT) * m
    t = torch.arange(delta.shape[1], device=delta.device)
    s_minus_t = t[None, :] - t[:, None]
    discount_TS = torch.where(s_minus_t >= 0, (gamma * lam) ** s_minus_t.clamp(min=0).to(delta), 0.0)  # (γλ)^(s-t)
    adv = (delta @ discount_TS.T) * m
    return adv, (adv + values_BT) * m


def whiten(x_BT, mask_BT, all_sum=lambda v: v):
    """(x - mean) / std over the masked entries; all_sum makes the moments those of the global batch."""
    m = mask_BT.float()
    n = all_sum(m.sum()).clamp(min=1)
    mean = all_sum((x_BT * m).sum()) / n
    var = all_sum((((x_BT - mean) * m) ** 2).sum()) / n
    return (x_BT - mean.to(x_BT)) * torch.rsqrt(var.to(x_BT) + 1e-8) * m


def policy_loss(logps_BT, old_logps_BT, adv_BT, mask_BT, clip_eps, n_tokens):
    """Σ_t max(-Â_t ρ_t, -Â_t clip(ρ_t, 1-ε, 1+ε)) / n_tokens, n_tokens the global minibatch count
    -> (loss, clipped_BT)."""
    ratio = torch.exp(logps_BT - old_logps_BT)
    unclipped, clipped = -adv_BT * ratio, -adv_BT * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = (torch.maximum(unclipped, clipped) * mask_BT).sum() / max(n_tokens, 1)
    return loss, (clipped > unclipped) & mask_BT


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, vf_clip, n_tokens):
    """Σ_t ½ max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²) / n_tokens -> (loss, clipped_BT)."""
    v_clip = old_values_BT + (values_BT - old_values_BT).clamp(-vf_clip, vf_clip)
    unclipped, clipped = (values_BT - returns_BT) ** 2, (v_clip - returns_BT) ** 2
    loss = 0.5 * (torch.maximum(unclipped, clipped) * mask_BT).sum() / max(n_tokens, 1)
    return loss, (clipped > unclipped) & mask_BT


def adaptive_kl(beta, kl, kl_target, n_samples, horizon):
    """Ziegler et al.'s proportional controller: e = clip(KL/KL_target - 1, ±0.2), β ← β (1 + e·n/horizon)."""
    return beta * (1 + max(-0.2, min(0.2, kl / kl_target - 1)) * n_samples / horizon)


def load_prompts(path, tok, args, need_str=False, need_answer=False):
    """-> [(prompt ids, answer or None, prompt text, {"record", "where"})], prompts rendered by the chat template's
    generation prompt."""
    out, n_long = [], 0
    for where, rec in data.read_jsonl(path):
        raw = data.field(rec, where, "prompt", str if need_str else (str, list))
        answer = data.field(rec, where, "answer", str) if "answer" in rec or need_str or need_answer else None
        ids = encode_prompt(tok, data.messages(raw, where, "prompt", "user"))
        fits = len(ids) + args.max_new_tokens <= args.max_len
        out += [(ids, answer, raw, {"record": rec, "where": where})] * fits
        n_long += not fits
    return out, n_long


def check_reward_tokenizer(tok, args):
    """The RM reads the actor's sampled ids. It was trained on encode_response cut after the response's end-of-turn
    token: prompt + sampled ids up to EOS are that sequence only with the same vocabulary and a chat template that
    closes an assistant turn with the EOS token."""
    if args.reward_model == "runs/rm" and not os.path.exists(args.reward_model):
        data.fail("runs/rm not found: run algos/rm.py first, or pass --reward_model")
    if load_tokenizer(args.reward_model, args.trust_remote_code).get_vocab() != tok.get_vocab():
        data.fail(f"reward model {args.reward_model!r} has another tokenizer than {args.model!r}; "
                  "it must read the sampled ids")
    ids, labels = encode_response(tok, [{"role": "user", "content": "1"}], [{"role": "assistant", "content": "2"}])
    if ids[max(i for i, l in enumerate(labels) if l != IGNORE)] != tok.eos_token_id:
        data.fail(f"chat template of {args.model!r} does not end an assistant turn "
                  f"with the EOS token {tok.eos_token!r}")


def load_models(args, tok, use_rm, world, device):
    """-> (actor, reference, reward model or None, critic), in eval mode, dropout off in each (TRL #744): actor and
    reference (causal LMs), the reward model (score read at the last non-pad token), and the critic: the reward
    model's backbone with the same bias-free score head applied at every position; with the verifier, the SFT
    model's backbone with a new head, zeroed so that V starts at 0 (the verifier's failure). Loaded in this order:
    the new head's initialisation draws from the RNG."""
    actor = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code), args)
    actor = dist.shard(actor, world, device).eval()
    if args.lora_r and args.ref_model == args.model:
        ref = lora.adapters_off(actor)  # the starting model: the actor with its adapters disabled, no second copy
    else:
        ref = load_model(args.ref_model, tok, device, args.trust_remote_code)
        ref = dist.shard(ref, world, device).eval().requires_grad_(False)
    rm = None
    if use_rm:
        rm = load_model(args.reward_model, tok, device, args.trust_remote_code, cls=AutoModelForSequenceClassification)
        rm = dist.shard(rm, world, device).eval().requires_grad_(False)
        if rm.config.pad_token_id != tok.pad_token_id or tok.pad_token_id == tok.eos_token_id:  # the head pools non-pad
            data.fail(f"reward model {args.reward_model!r} needs the tokenizer's pad token {tok.pad_token!r}, "
                      "and one other than EOS")
    critic = load_model(args.reward_model if use_rm else args.model, tok, device, args.trust_remote_code,
                        cls=AutoModelForTokenClassification, num_labels=1, classifier_dropout=0.0,
                        token_classification_bias=False)
    if not use_rm:
        torch.nn.init.zeros_(critic.score.weight)
    return actor, ref, rm, dist.shard(lora.wrap(critic, args), world, device).eval()


@torch.no_grad()
def rollout(actor, sampler, prompt_ids, gen_cfg, tok, static_len, device):
    """Left-padded prompts -> completions sampled with the KV cache: (ids_BL, attn_BL, P, mask_BT, has_eos_B); the
    mask holds every token up to and including the first EOS. static_len > 0: a fixed-size cache (compiled decode on
    CUDA). Without autocast, in the weights' own dtype (fp32, or bf16 through the sampler): see common.sampling."""
    P = max(map(len, prompt_ids))
    x = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompt_ids], device=device)
    lens = torch.tensor([len(p) for p in prompt_ids], device=device)
    attn = (torch.arange(P, device=device) >= P - lens[:, None]).long()
    policy = bf16_sampler(actor, sampler) if sampler is not None else actor
    cache = dist.cache_kwarg(actor, StaticCache(config=actor.config, max_cache_len=static_len)) if static_len else {}
    with dist.gathered(policy):  # under FSDP2: the weights gathered once for all tokens, not at every token
        out = policy.generate(input_ids=x, attention_mask=attn, generation_config=gen_cfg,
                              synced_gpus=dist.rank_world()[1] > 1, **cache)
    is_eos = out[:, P:] == tok.eos_token_id
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # no EOS strictly before t
    return out, torch.cat([attn, mask.long()], 1), P, mask, is_eos.any(1)


def forward(model, ids, attn, T, **kw):
    """Logits (or values) at the T positions that predict the completion tokens; positions count real tokens only."""
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # as generate() numbered them under left padding
    with dist.autocast(ids.device):
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kw)
        return out.logits[:, -T - 1:-1]


def sampled_logps(model, ids, attn, T, temperature, entropy_grad=False):
    """log π(y_t) = z[y_t] - logsumexp(z) and H_t = logsumexp(z) - Σ_v softmax(z)_v z_v, z = logits / temperature
    (the sampled distribution), for the T completion tokens: (B, T) each."""
    logits_BTV = forward(model, ids, attn, T, logits_to_keep=T + 1)
    logps_N, ents_N = logps_entropy(logits_BTV.flatten(0, 1), ids[:, -T:].flatten(), temperature, entropy_grad)
    return logps_N.view(-1, T), ents_N.view(-1, T)


@torch.no_grad()
def rm_score(rm, prompt_ids, comp_BT, mask_BT, has_eos_B, tok):
    """r_ψ(x, y) read at the end-of-turn token; a truncated completion gets one appended first (deviation 4)."""
    comp_BT = torch.cat([comp_BT, torch.full_like(comp_BT[:, :1], tok.pad_token_id)], 1)
    mask_BT = torch.cat([mask_BT, torch.zeros_like(mask_BT[:, :1])], 1)
    cut = (~has_eos_B).nonzero().squeeze(1)
    end = mask_BT.sum(1)[cut]
    comp_BT[cut, end], mask_BT[cut, end] = tok.eos_token_id, True
    return rm_scores(rm, prompt_ids, comp_BT, mask_BT, 1, tok.pad_token_id, comp_BT.device)


def evaluate(actor, sampler, rm, tok, eval_prompts, greedy, static_len, device):
    """Gold: held-out greedy accuracy (toy.evaluate); RM: mean score of the same prompts' greedy completions.
    Without an eval set: {}, and the metrics line has no eval keys."""
    if not eval_prompts:
        return {}
    acc = toy.evaluate(actor, tok, [{"prompt": raw, "answer": a} for _, a, raw, _ in eval_prompts])
    if rm is None:
        return {"eval/accuracy": acc}
    rank, world = dist.rank_world()
    per = -(-len(eval_prompts) // world)
    mine, sums = eval_prompts[rank * per:(rank + 1) * per], dist.Sums(device)
    for i in range(0, per, 256):  # the same number of generate calls on every process
        chunk = mine[i:i + 256]
        prompt_ids = [p for p, *_ in chunk or eval_prompts[:1]]
        ids, attn, P, mask, has_eos = rollout(actor, sampler, prompt_ids, greedy, tok, static_len, device)
        scores = rm_score(rm, prompt_ids, ids[:, P:], mask, has_eos, tok)[:len(chunk)]
        sums.add({"rm_score": scores.sum(), "samples": len(scores)})
    s = sums.reduce()
    return {"eval/accuracy": acc, "eval/rm_score": s["rm_score"] / s["samples"]}


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    static = data.resolve(args.static_cache, auto=device.type == "cuda" and world == 1)
    static_len = args.max_len if static else 0  # positions of the sampling cache (0: a dynamic cache)
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("rl.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.ref_model = args.ref_model or args.model
    say = tqdm.write if rank == 0 else (lambda *_: None)
    use_rm = args.reward == "model"
    rows = args.batch_size * args.group_size  # completions per process per rollout
    if rows % (args.num_minibatches * args.grad_accum):
        data.fail("batch_size*group_size must be a multiple of num_minibatches*grad_accum")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    if args.reward_fn and use_rm:
        data.fail("--reward_fn is the reward of --reward verifier; with --reward model the reward model scores")
    fns = load_rewards(args.reward_fn)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    if use_rm:
        check_reward_tokenizer(tok, args)
    prompts, n_long = load_prompts(args.data, tok, args, need_answer=not (use_rm or args.reward_fn))
    eval_prompts = load_prompts(args.eval_data, tok, args, need_str=True)[0] if args.eval_data else []
    say(f"{len(prompts)} prompts; {n_long} longer than max_len - max_new_tokens were dropped")
    G = args.batch_size * world  # prompts per rollout
    if len(prompts) < G:
        data.fail(f"{args.data}: {len(prompts)} prompts fit max_len={args.max_len}, "
                  f"fewer than one global batch of {G}")
    if args.reward_fn:
        reward(fns, [""], [prompts[0][3]["record"]], [prompts[0][3]["where"]], device)  # a failing function fails now
    steps_per_epoch = len(prompts) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Models: actor, reference, reward model and critic (see load_models), each in eval mode with dropout off
    actor, ref, rm, critic = load_models(args, tok, use_rm, world, device)
    sampler = bf16_sampler(actor) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    if args.gradient_checkpointing:
        for m in (actor, critic):
            dist.gradient_checkpointing(m)  # recompute each layer's activations in backward: less memory
    both = torch.nn.ModuleDict({"actor": actor, "critic": critic})  # one checkpoint for both, written atomically
    both.register_buffer("beta", torch.tensor(args.beta, dtype=torch.float64, device="cpu"))  # the KL controller
    opt = torch.optim.AdamW([{"params": lora.trainable(actor), "lr": args.lr},
                             {"params": lora.trainable(critic), "lr": args.critic_lr}], weight_decay=args.weight_decay,
                            fused=device.type == "cuda")  # one kernel for the whole update on CUDA
    sched = get_constant_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps))
    start, metrics, ckpt = start_run(args, both, opt, sched, rank)
    if not start:
        say(f"{total_steps} rollouts of {G * args.group_size} completions")
    gen = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sampling = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, **gen)
    greedy = GenerationConfig(do_sample=False, **gen)  # nothing from the model's own generation config in either

    # Loop
    if start == 0:  # the starting point, so every run reports before and after
        metrics.log(0, **evaluate(actor, sampler, rm, tok, eval_prompts, greedy, static_len, device))
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="ppo")
    t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
    for step in bar:
        # Rollout: sample, then score with the frozen models and with the critic as it is now (old values).
        epoch, k = divmod(step, steps_per_epoch)
        epoch_rng = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(prompts), generator=epoch_rng, device="cpu")
        idx = order[k * G + rank * args.batch_size:k * G + (rank + 1) * args.batch_size]
        batch = [prompts[j] for j in idx.tolist() for _ in range(args.group_size)]
        prompt_ids, answers = [p for p, *_ in batch], [a for _, a, *_ in batch]
        t_gen = time.time()
        ids, attn, P, mask, has_eos = rollout(actor, sampler, prompt_ids, sampling, tok, static_len, device)
        timing["generate"] += time.time() - t_gen  # generate reads its last token on the host: sampling has finished
        T = ids.shape[1] - P
        with torch.no_grad():
            old_logps, _ = sampled_logps(actor, ids, attn, T, args.temperature)
            ref_logps, _ = sampled_logps(ref, ids, attn, T, args.temperature)
            old_values = forward(critic, ids, attn, T)[..., 0].float()
            texts = tok.batch_decode(ids[:, P:], skip_special_tokens=True)
            gold = [toy.verify(t, a) for t, a in zip(texts, answers) if a is not None]  # with the verifier: r(x, y)
            if use_rm:
                scores, parts = rm_score(rm, prompt_ids, ids[:, P:], mask, has_eos, tok), {}
            elif args.reward_fn:  # Σ_k w_k·f_k(completion, record)
                scores, parts = reward(fns, texts, [src["record"] for *_, src in batch],
                                       [src["where"] for *_, src in batch], device)
            else:
                scores, parts = torch.tensor(gold, device=device), {}
            comps = [row[:int(n)] for row, n in zip(ids[:, P:].tolist(), mask.sum(-1).tolist())]
            groups = [comps[j:j + args.group_size] for j in range(0, len(comps), args.group_size)]
            k3_BT = kl_estimate(old_logps, ref_logps, "k3")
            stats = dist.Sums(device)  # the rollout's statistics by name, before --mask_truncated masks any token
            stats.add({"reward": scores.sum(), "reward_sq": (scores ** 2).sum(), "samples": len(scores),
                       "gold": sum(gold), "gold_samples": len(gold), "completion_tokens": mask.sum(),
                       "truncated": (~has_eos).sum(), "kl": (k3_BT * mask).sum(),
                       "distinct2": sum(distinct2(c) for c in groups), "groups": len(groups),
                       **{f"reward/{name}": v.sum() for name, v in parts.items()}})

            # Advantages: r_t = -β KL_t + [t=T] r(x,y), GAE over the old values, whitened over the global batch.
            if args.mask_truncated:
                mask &= has_eos[:, None]
            beta = both.beta.item()
            kl_BT = kl_estimate(old_logps, ref_logps, args.kl_estimator) * mask
            rewards = token_rewards(scores - args.missing_eos_penalty * (~has_eos), kl_BT, mask,
                                    beta if args.kl_placement == "reward" else 0.0)
            adv, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
            adv = whiten(adv, mask, lambda v: dist.all_sum(v).to(v))
            stats.add({"kl_penalised": kl_BT.sum()})

        # Update: PPO epochs over shuffled minibatches; each loss is over its minibatch's global token count.
        names = ["loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac", "vf_clip_frac", "grad_norm"]
        upd, n_updates = dict.fromkeys(names, 0.0), 0  # sums over the applied updates of their minibatch means
        both.train(args.gradient_checkpointing)  # transformers checkpoints a layer only in train mode; dropout is 0
        for u in range(args.ppo_epochs * args.num_minibatches):
            if u % args.num_minibatches == 0:
                minibatches = iter(torch.randperm(rows, device="cpu").view(args.num_minibatches, -1))
            mb = next(minibatches)
            n_tok = dist.all_sum(mask[mb].sum()).item()
            mb_sums = dist.Sums(device)  # each a mean over the minibatch's global token count, once reduced
            for i, mi in enumerate(mb.view(args.grad_accum, -1)):
                if world > 1:
                    actor.set_requires_gradient_sync(i == args.grad_accum - 1)
                    critic.set_requires_gradient_sync(i == args.grad_accum - 1)
                m = mask[mi]
                new_logps, ent = sampled_logps(actor, ids[mi], attn[mi], T, args.temperature, args.ent_coef > 0)
                values = forward(critic, ids[mi], attn[mi], T)[..., 0].float()
                pg, pg_clipped = policy_loss(new_logps, old_logps[mi], adv[mi], m, args.clip_eps, n_tok)
                vf, vf_clipped = value_loss(values, old_values[mi], returns[mi], m, args.vf_clip, n_tok)
                entropy = (ent * m).sum() / max(n_tok, 1)
                loss = pg + args.vf_coef * vf - args.ent_coef * entropy
                if args.kl_placement == "loss":  # + β Ê_t[KL_t(πθ‖π_ref)], differentiated through log πθ
                    kl_loss_BT = kl_estimate(new_logps, ref_logps[mi], args.kl_estimator)
                    loss = loss + beta * (kl_loss_BT * m).sum() / max(n_tok, 1)
                (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
                approx_kl = (kl_estimate(old_logps[mi], new_logps.detach(), "k3") * m).sum()  # k3 of KL(π_old‖πθ)
                per_token = max(n_tok, 1)
                mb_sums.add({"loss": loss, "policy_loss": pg, "value_loss": vf, "entropy": entropy,
                             "approx_kl": approx_kl / per_token, "clip_frac": pg_clipped.sum() / per_token,
                             "vf_clip_frac": vf_clipped.sum() / per_token})
            mb_means = mb_sums.reduce()
            if not math.isfinite(mb_means["loss"]):
                data.fail(f"non-finite loss {mb_means['loss']} at step {step + 1}; stopping without saving a model")
            if args.target_kl and mb_means["approx_kl"] > args.target_kl:  # πθ has left π_old's trust region:
                opt.zero_grad(set_to_none=True)  # drop this update, stop
                break
            mb_means["grad_norm"] = dist.clip_grads(actor, args.max_grad_norm).item()
            dist.clip_grads(critic, args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for name in names:
                upd[name] += mb_means[name]
            n_updates += 1
        both.eval()  # rollouts and evaluation generate with the KV cache, which train mode would drop
        sched.step()

        # Log: the global rollout's statistics; the KL controller reads the mean sequence KL the reward penalised.
        s = stats.reduce()
        kl_seq = s["kl_penalised"] / s["samples"]
        if args.adaptive_kl:
            both.beta.fill_(adaptive_kl(beta, kl_seq, args.kl_target, s["samples"], args.kl_horizon))
        tokens += dist.all_sum(attn.sum().item()).item()
        done = step + 1
        timing["steps"] += 1
        if done % args.log_every == 0 or done == total_steps:
            seconds = time.time() - t_log
            tps = tokens / seconds
            mean = s["reward"] / s["samples"]
            std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
            extra = {}
            if (args.eval_every and done % args.eval_every == 0) or done == total_steps:
                extra = evaluate(actor, sampler, rm, tok, eval_prompts, greedy, static_len, device)
            extra.update({"reward/gold": s["gold"] / s["gold_samples"]} if s["gold_samples"] else {})
            if args.reward_fn:  # each reward function apart, before weighting
                extra.update({f"reward/{f.name}": s[f"reward/{f.name}"] / s["samples"] for f in fns})
            metrics.log(done, **{name: upd[name] / max(n_updates, 1) for name in names}, lr=sched.get_last_lr()[0],
                        beta=beta, kl=s["kl"] / s["completion_tokens"], kl_seq=kl_seq,
                        response_length=s["completion_tokens"] / s["samples"],
                        truncated_frac=s["truncated"] / s["samples"],
                        distinct2=s["distinct2"] / s["groups"], ppo_updates=n_updates, tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                        step_s=seconds / timing["steps"], generate_s=timing["generate"] / timing["steps"], **extra)
            t_log, tokens, timing = time.time(), 0.0, {"generate": 0.0, "steps": 0}
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            dist.save_checkpoint(ckpt, both, opt, sched, done, rank)

    # Save: the actor, and the critic (the value model) to continue training from
    dist.save_model(actor, tok, args.output_dir, rank, merge_lora=args.merge_lora)
    os.makedirs(os.path.join(args.output_dir, "critic"), exist_ok=True)
    dist.save_model(critic, tok, os.path.join(args.output_dir, "critic"), rank, merge_lora=args.merge_lora)
    say(f"saved {args.output_dir} (critic in {args.output_dir}/critic)")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
