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
Data: JSONL, {"prompt": ..., "answer": ...} (prompt: a string or a message list); reward = common.toy.verify, the
weighted sum of --reward_fn functions of the completion and its record (common/rewards.py), or the score of
--reward_model (a sequence-classification model, rm.py); with either of the last two "answer" is optional.
Run:  python algos/rft.py
      torchrun --nproc_per_node 8 algos/rft.py --model runs/sft --data prompts.jsonl --max_new_tokens 256
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, GenerationConfig, get_constant_schedule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.logps import label_logps  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.rewards import load_rewards, reward  # noqa: E402
from common.packing import pad  # noqa: E402
from common.sampling import bf16_sampler, generate, rm_scores  # noqa: E402
from common.template import IGNORE, encode_prompt  # noqa: E402


@dataclass
class Args:
    rounds: int = 6  # sample -> select -> fine-tune rounds
    prompts_per_round: int = 256  # prompts sampled per round over all processes (a multiple of gen_batch_size x procs)
    num_samples: int = 8  # n: completions sampled per prompt
    min_reward: float = 1.0  # r_min: a prompt whose best reward is below it keeps nothing (verifier: correct only)
    keep_per_prompt: int = 1  # at most this many distinct completions tied at the best reward, first sampled first
    epochs_per_round: int = 1  # passes over the round's kept set
    steps_per_round: int = 0  # optimizer steps per round instead of epochs_per_round passes (0: passes)
    model: str = "runs/sft"  # path or hub name of the policy to start from; default: the SFT output
    reward_model: str = ""  # sequence-classification reward model (rm.py); default: the verifier on "answer"
    reward_fn: list[str] = field(default_factory=list)  # FILE.py:NAME[:WEIGHT], repeatable, instead of the verifier
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded RL prompts
    eval_data: str = ""  # held-out {"prompt", "answer"} JSONL; default: the embedded eval set when --data is not given
    output_dir: str = "runs/rft"  # model, args.json, metrics.jsonl, checkpoint/
    max_len: int = 128  # prompt + completion tokens; longer prompts are dropped (and counted)
    gen_batch_size: int = 64  # prompts per process per generate call (each sampled num_samples times)
    batch_size: int = 16  # kept sequences per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_new_tokens: int = 12  # completion length limit
    temperature: float = 1.0  # sampling temperature (the loss is the plain log-likelihood, at temperature 1)
    top_p: float = 1.0  # nucleus sampling
    lr: float = 5e-4  # learning rate (AdamW), constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # seed of the prompt order, the sampling and every RNG
    eval_every: int = 1  # rounds between evaluations (0: only at the start and the end)
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    save_every: int = 0  # rounds between resumable checkpoints (0: none)
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
            recs.append({"ids": ids, "prompt": rec["prompt"], "answer": answer, "record": rec, "where": where})
    return recs, n_long


@torch.no_grad()
def rollout(policy, rm, fns, recs, seed, tok, gen_cfg, n, static_len, device):
    """n samples of each prompt, scored by the reward model r_ψ(x, y), or the verifier or reward functions ->
    (completions comp_NC, mask_NC, ended_N, rewards_N, {function name: its rewards}), a prompt's samples
    consecutive."""
    torch.manual_seed(seed)  # samples depend on (round, chunk) only, not on the process count
    prompt_ids = [r["ids"] for r in recs]
    comp, mask, ended = generate(policy, prompt_ids, n, tok, gen_cfg, device, dist.rank_world()[1] > 1, static_len)
    if rm is not None:
        return comp, mask, ended, rm_scores(rm, prompt_ids, comp, mask, n, tok.pad_token_id, device), {}
    texts = tok.batch_decode(comp, skip_special_tokens=True)
    each = [r for r in recs for _ in range(n)]
    rewards, parts = reward(fns, texts, [r["record"] for r in each], [r["where"] for r in each], device)
    return comp, mask, ended, rewards, parts


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    static = data.resolve(args.static_cache, auto=device.type == "cuda" and world == 1)
    static_len = args.max_len if static else 0  # positions of the sampling cache (0: a dynamic cache)
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("rl.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    say = tqdm.write if rank == 0 else (lambda *_: None)
    for name in ("prompts_per_round", "gen_batch_size", "keep_per_prompt", "epochs_per_round", "steps_per_round"):
        least = int(name != "steps_per_round")
        if getattr(args, name) < least:
            data.fail(f"--{name} must be {'positive' if least else 'non-negative'}, got {getattr(args, name)}")
    per_call = args.gen_batch_size * world  # prompts per generate call of all processes (each runs as many calls)
    if args.prompts_per_round % per_call:
        data.fail(f"--prompts_per_round must be a multiple of gen_batch_size x processes = {per_call}")

    # Data: validated and tokenized before anything is written, so bad input leaves no output behind.
    if args.reward_fn and args.reward_model:
        data.fail("--reward_fn and --reward_model both score the samples: give one")
    fns = load_rewards(args.reward_fn)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    prompts, n_long = load_prompts(args.data, tok, args, need_answer=not (args.reward_model or args.reward_fn))
    eval_prompts = load_prompts(args.eval_data, tok, args)[0] if args.eval_data else []
    eval_recs = [{"prompt": r["prompt"], "answer": r["answer"]} for r in eval_prompts]
    say(f"{len(prompts)} prompts; {n_long} longer than max_len={args.max_len} - max_new_tokens were dropped")
    P, n = args.prompts_per_round, args.num_samples
    if len(prompts) < P:
        data.fail(f"{args.data}: {len(prompts)} prompts, fewer than one round of {P}")
    if not args.reward_model:
        reward(fns, [""], [prompts[0]["record"]], [prompts[0]["where"]], device)  # a function that fails, fails now
    rounds_per_epoch = len(prompts) // P

    # Models: the policy (dropout as its config has it: its update is sft.py's), and the frozen reward model when one
    # is given (else the verifier scores).
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code, dropout=True), args)
    model = dist.shard(model, world, device)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    sampler = bf16_sampler(model) if static and world == 1 else None  # the fixed-size cache's decode runs in bf16
    rm = None
    if args.reward_model:
        rm = load_model(args.reward_model, tok, device, args.trust_remote_code, cls=AutoModelForSequenceClassification)
        rm = dist.shard(rm, world, device).eval().requires_grad_(False)
        rm_tok = load_tokenizer(args.reward_model, args.trust_remote_code)
        if rm_tok.get_vocab() != tok.get_vocab():  # it must read the sampled ids
            data.fail(f"reward model {args.reward_model!r} has another tokenizer than {args.model!r}")
        if rm.config.pad_token_id != tok.pad_token_id or tok.pad_token_id == tok.eos_token_id:  # it pools the last
            data.fail(f"reward model {args.reward_model!r} needs the tokenizer's pad token {tok.pad_token!r}, "
                      "and one other than EOS")  # non-pad token
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # nothing else from the model's own config
    opt = adamw(model, args, device)
    sched = get_constant_schedule(opt)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank, unit="round")

    def evaluate():  # without an eval set: {}, and the metrics line has no eval keys
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)} if args.eval_data else {}

    # Loop
    if start == 0:
        metrics.log(0, **evaluate())  # the starting point, so every run reports before and after
    bar = tqdm(range(start, args.rounds), initial=start, total=args.rounds, disable=rank != 0, desc="rft")
    t_log, tokens = time.time(), 0.0
    for rnd in bar:
        epoch, k = divmod(rnd, rounds_per_epoch)
        epoch_rng = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(prompts), generator=epoch_rng, device="cpu")
        idx = order[k * P:(k + 1) * P].tolist()

        # Rollout: this process's chunks of the round's prompts, n samples each, scored; then every process gathers
        # all samples (ids + 1, 0 past the end of each completion), so selection below is the same everywhere.
        model.eval()
        policy = bf16_sampler(model, sampler) if sampler is not None else model
        sums = dist.Sums(device)
        n_chunks = P // args.gen_batch_size
        comp_table = torch.zeros(P * n, args.max_new_tokens, dtype=torch.long, device=device)
        reward_table, ended_table = torch.zeros(P * n, device=device), torch.zeros(P * n, device=device)
        for g in range(rank, n_chunks, world):
            recs = [prompts[j] for j in idx[g * args.gen_batch_size:(g + 1) * args.gen_batch_size]]
            comp, mask, ended, rewards, parts = rollout(policy, rm, fns, recs, args.seed * 10**9 + rnd * 10**4 + g,
                                                        tok, gen_cfg, n, static_len, device)
            rows = slice(g * args.gen_batch_size * n, (g + 1) * args.gen_batch_size * n)
            comp_table[rows, :comp.shape[1]] = (comp + 1) * mask
            reward_table[rows], ended_table[rows] = rewards, ended.float()
            sums.add({"reward": rewards.sum(), "reward_sq": (rewards ** 2).sum(), "samples": len(rewards),
                      "completion_tokens": mask.sum(), "truncated": (~ended).sum(),
                      **{f"reward/{name}": v.sum() for name, v in parts.items()}})
            tokens += sum(len(r["ids"]) for r in recs) * n + mask.sum().item()
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

        # Update: SFT on the kept set, a global batch of batch_size x grad_accum x processes sequences a step.
        model.train()
        GB = args.batch_size * args.grad_accum * world
        n_steps = (args.steps_per_round or -(-args.epochs_per_round * len(docs) // GB)) if docs else 0
        train_rng = torch.Generator().manual_seed(args.seed * 10**9 + rnd * 10**4 + n_chunks)  # after the chunks
        passes = -(-n_steps * GB // max(len(docs), 1))  # shuffled passes over the kept set, back to back
        perms = [torch.randperm(len(docs), generator=train_rng, device="cpu").tolist() for _ in range(passes)]
        stream = [i for perm in perms for i in perm]
        losses, gnorm = [], torch.zeros((), device=device)
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
                # log πθ(y_t | x, y_<t) = log softmax(logits_t)[y_t] at every completion token
                with dist.autocast(device):
                    logps = label_logps(model, fwd, b["labels"], dist.logits_budget(args.loss_chunk, device))
                loss = -logps.sum() / max(n_tokens, 1)  # L = -(1/N) Σ log πθ(y_t | x, y_<t): the SFT loss
                (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
                loss_sum += loss.item()
                tokens += b["attention_mask"].sum().item()
            loss_step = dist.all_sum(loss_sum).item()
            if not math.isfinite(loss_step):
                data.fail(f"non-finite loss {loss_step} at round {rnd + 1}; stopping without saving a model")
            gnorm = dist.clip_grads(model, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_step)

        # Log: this round's samples, kept set and updates, over all processes; evaluate; checkpoint
        done = rnd + 1
        s = sums.reduce()
        mean = s["reward"] / s["samples"]
        std = math.sqrt(max(s["reward_sq"] / s["samples"] - mean ** 2, 0.0))
        tps = dist.all_sum(tokens).item() / (time.time() - t_log)
        extra = evaluate() if (args.eval_every and done % args.eval_every == 0) or done == args.rounds else {}
        trained = {"loss": sum(losses) / n_steps, "grad_norm": gnorm.item()} if n_steps else {}
        parts = {f"reward/{f.name}": s[f"reward/{f.name}"] / s["samples"] for f in fns} if args.reward_fn else {}
        if not docs:
            say(f"round {done}: no prompt's best sample reached min_reward={args.min_reward}; nothing trained")
        metrics.log(done, **trained, steps=n_steps, lr=sched.get_last_lr()[0], tokens_per_s=tps,
                    peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **{"reward/mean": mean, "reward/std": std},
                    **parts, kept=len(docs), kept_frac=n_kept_prompts / len(set(map(tuple, sample_prompts))),
                    response_length=s["completion_tokens"] / s["samples"], truncated_frac=s["truncated"] / s["samples"],
                    **extra)
        t_log, tokens = time.time(), 0.0
        if args.save_every and done % args.save_every == 0 and done < args.rounds:
            dist.save_checkpoint(ckpt, model, opt, sched, done, rank)

    # Save
    dist.save_model(model, tok, args.output_dir, rank, merge_lora=args.merge_lora)
    say(f"saved {args.output_dir}")
    dist.close()


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
