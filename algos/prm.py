"""Process reward model (PRM): a score for every step of a solution, trained on step labels from Monte Carlo rollouts.

Labels (Math-Shepherd): the policy samples a solution to each prompt, one step a line. After each step k, M
completions are sampled from the solution's prefix up to and including that step, and the step is labelled by
whether any of them reaches the right answer (the verifier of the final number), or by the share that does:

    y_k = 1[any completion j of prefix s_1..s_k reaches the answer]           (hard, the default)
    y_k = (1/M) Σ_j 1[completion j of prefix s_1..s_k reaches the answer]     (soft: --hard_labels false)

The last step needs no rollout: its label is the verifier's outcome of the whole solution. The model is the policy
with a scalar head at every position (token classification); the score s_k is read at the end of step k (the token
that ends its line, or the end-of-turn token for the last step) and trained by binary cross-entropy over the global
batch's S steps:

    L(φ) = -(1/S) Σ_k [y_k log σ(s_k) + (1 - y_k) log(1 - σ(s_k))]

Best-of-N search with the PRM (algos/best_of_n.py) scores a solution by its steps' σ(s_k): the minimum, the product
or the last.
References: Lightman et al., arXiv:2305.20050 (PRM800K; min and product); Wang et al., arXiv:2312.08935
(Math-Shepherd; Monte Carlo labels, hard and soft).
Deviations:
  1. The policy that labels is a copy on each process, unsharded, in eval mode: sampling needs no gradients, and each
     process labels its own share of the prompts, which are then gathered (the same labels on any process count).
  2. Held-out step accuracy uses exact labels instead of rollouts: a held-out record carries its correct steps, and a
     sampled step is right while every step up to it equals the reference's.
Data: JSONL, {"prompt": ..., "answer": ...}; held-out {"prompt", "answer", "steps": [...]}; default: the embedded
multi-step task (chain_rl.jsonl, chain_eval.jsonl).
Run:  python algos/sft.py --data runs/toy/data/chain_sft.jsonl --eval_data runs/toy/data/chain_eval.jsonl \
          --output_dir runs/sft_chain    # the policy on the multi-step task, then:
      python algos/prm.py
      torchrun --nproc_per_node 8 algos/prm.py --model runs/math-sft --data prompts.jsonl --rollouts 8
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForTokenClassification, GenerationConfig, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.sampling import generate  # noqa: E402
from common.template import encode_prompt, step_ends  # noqa: E402


@dataclass
class Args:
    rollouts: int = 8  # M: completions sampled from each step's prefix to label it
    hard_labels: bool = True  # label a step 1 when any rollout reaches the answer; false: the share that does
    num_prompts: int = 1024  # prompts whose sampled solutions are labelled (0: every prompt of --data)
    temperature: float = 1.0  # sampling temperature of the solutions and the rollouts
    max_new_tokens: int = 48  # length limit of a solution (and of a rollout)
    model: str = "runs/sft_chain"  # the policy: labels its own solutions, and the PRM starts from it
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded multi-step prompts
    eval_data: str = ""  # JSONL of {"prompt", "answer", "steps"}; default: the embedded held-out chains
    output_dir: str = "runs/prm"  # model, labels.jsonl, args.json, metrics.jsonl, checkpoint/
    batch_size: int = 32  # solutions per process per micro-batch
    gen_batch_size: int = 64  # prompts per generate call while labelling
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 300  # optimizer steps; 0: run --epochs over the labelled solutions
    epochs: int = 1  # passes over the labelled solutions when max_steps is 0
    warmup_ratio: float = 0.05  # fraction of steps of linear warmup before the cosine decay
    seed: int = 0  # seed of the sampling, the data order and every RNG
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


def mc_labels(reached_KM, hard=False):
    """y_k = (1/M) Σ_j reached_kj: the share of step k's M rollouts that reach the answer; hard: 1[y_k > 0]."""
    y = reached_KM.float().mean(-1)
    return (y > 0).float() if hard else y


def prm_loss(scores_S, labels_S, n_steps):
    """-(1/S) Σ_k [y_k log σ(s_k) + (1 - y_k) log(1 - σ(s_k))] over a micro-batch's steps, S = n_steps the steps of
    the whole optimizer step (every micro-batch and process)."""
    return F.binary_cross_entropy_with_logits(scores_S, labels_S, reduction="sum") / max(n_steps, 1)


def step_auc(scores, labels):
    """Area under the ROC curve: P(s_right > s_wrong) over every pair of a right and a wrong step, ties counting
    1/2 (Mann-Whitney); 1/2 when either kind is missing."""
    right, wrong = scores[labels > 0.5], scores[labels <= 0.5]
    if len(right) == 0 or len(wrong) == 0:
        return 0.5
    diff = right[:, None] - wrong[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def exact_labels(text, steps):
    """Held-out steps' labels (deviation 2): step k is right while the solution's lines 1..k equal the reference's."""
    lines, labels, right = text.strip().split("\n"), [], True
    for k, line in enumerate(lines):
        right = right and k < len(steps) and line.strip() == steps[k]
        labels.append(float(right))
    return labels


@torch.no_grad()
def label(policy, recs, tok, gen_cfg, args, device, rollouts=True):
    """Each prompt's sampled solution and, with rollouts, its steps' Monte Carlo labels -> [{"ids", "comp" (the
    solution's tokens), "ends" (its step ends), "labels", "record"}] in the prompts' order. The prompts go in chunks
    of gen_batch_size, the chunks split over processes and each seeded by its index, so any number of processes
    draws the same solutions and rollouts; the chunks' results are gathered on every process."""
    rank, world = dist.rank_world()
    chunks = [recs[i:i + args.gen_batch_size] for i in range(0, len(recs), args.gen_batch_size)]
    done = {}
    for c in range(rank, len(chunks), world):
        torch.manual_seed(args.seed * 10**6 + c * 10**3)  # this chunk's solutions
        comp, mask, _ = generate(policy, [r["ids"] for r in chunks[c]], 1, tok, gen_cfg, device)
        out, prefixes, owners = [], [], []
        for r, ids, m in zip(chunks[c], comp.tolist(), mask.tolist()):
            ids = ids[:sum(m)]
            out.append({"ids": r["ids"], "comp": ids, "ends": step_ends(tok, ids), "record": r, "reached": []})
            for e in out[-1]["ends"][:-1] if rollouts else []:  # the last step's label is the solution's outcome
                prefixes.append(r["ids"] + ids[:e + 1])
                owners.append((len(out) - 1, ids[:e + 1]))
        for j in range(0, len(prefixes), args.gen_batch_size):
            torch.manual_seed(args.seed * 10**6 + c * 10**3 + 1 + j // args.gen_batch_size)  # its rollouts
            roll, rmask, _ = generate(policy, prefixes[j:j + args.gen_batch_size], args.rollouts, tok, gen_cfg,
                                      device)
            for n, (ids, m) in enumerate(zip(roll.tolist(), rmask.tolist())):
                owner, head = owners[j + n // args.rollouts]
                text = tok.decode(head + ids[:sum(m)], skip_special_tokens=True)
                out[owner]["reached"].append(toy.verify(text, out[owner]["record"]["answer"]))
        for s in out:
            K, M = len(s["ends"]), args.rollouts
            reached = torch.zeros(K, M, device="cpu")
            if rollouts:
                reached[:-1] = torch.tensor(s["reached"], device="cpu").view(K - 1, M)
            reached[-1] = toy.verify(tok.decode(s["comp"], skip_special_tokens=True), s["record"]["answer"])
            s["labels"] = mc_labels(reached, args.hard_labels).tolist()
            del s["reached"]
        done[c] = out
    return dist.gather_chunks(done, world)


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    embedded = not args.data
    args.data = args.data or toy.data("chain_rl.jsonl")
    args.eval_data = args.eval_data or (toy.data("chain_eval.jsonl") if embedded else "")
    say = tqdm.write if rank == 0 else (lambda *_: None)

    # Data: prompts (and held-out problems with their steps), validated before anything is written
    if args.model == "runs/sft_chain" and not os.path.exists(args.model):
        data.fail("runs/sft_chain not found: train it with algos/sft.py --data runs/toy/data/chain_sft.jsonl "
                  "--eval_data runs/toy/data/chain_eval.jsonl --output_dir runs/sft_chain, or pass --model")
    tok = load_tokenizer(args.model, args.trust_remote_code)
    recs = [{"ids": encode_prompt(tok, [{"role": "user", "content": data.field(r, w, "prompt", str)}]),
             "answer": data.field(r, w, "answer", str)} for w, r in data.read_jsonl(args.data)]
    recs = recs[:args.num_prompts or len(recs)]
    eval_recs = [{"ids": encode_prompt(tok, [{"role": "user", "content": data.field(r, w, "prompt", str)}]),
                  "answer": data.field(r, w, "answer", str), "steps": data.field(r, w, "steps", list)}
                 for w, r in (data.read_jsonl(args.eval_data) if args.eval_data else [])]
    G = args.batch_size * args.grad_accum * world  # solutions per optimizer step
    if len(recs) < G:
        data.fail(f"{args.data}: {len(recs)} prompts, fewer than one global batch of {G}")
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)

    # Labels: the policy, a whole copy on each process (deviation 1), samples a solution to each prompt and M
    # rollouts from each of its steps; held-out solutions are sampled too and labelled exactly
    policy = load_model(args.model, tok, device, args.trust_remote_code).to(device).eval()
    t0 = time.time()
    solutions = label(policy, recs, tok, gen_cfg, args, device)
    held_out = label(policy, eval_recs, tok, gen_cfg, args, device, rollouts=False) if eval_recs else []
    for s in held_out:
        s["labels"] = exact_labels(tok.decode(s["comp"], skip_special_tokens=True), s["record"]["steps"])
        s["ends"] = s["ends"][:len(s["labels"])]
        s["labels"] = s["labels"][:len(s["ends"])]
    del policy
    labels = [y for s in solutions for y in s["labels"]]
    say(f"labelled {len(solutions)} solutions, {len(labels)} steps, mean label {sum(labels) / len(labels):.3f} "
        f"({time.time() - t0:.0f} s)")
    steps_per_epoch = len(solutions) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Model: the policy with a new scalar head at every position, read at the step ends
    torch.manual_seed(args.seed)  # the head's initialisation, whichever chunks this process sampled
    model = load_model(args.model, tok, device, args.trust_remote_code, cls=AutoModelForTokenClassification,
                       num_labels=1, classifier_dropout=0.0, token_classification_bias=False)
    model = lora.wrap(model, args)  # with LoRA the score head trains whole
    model = dist.shard(model, world, device).train()
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)
    if rank == 0 and not start:
        toy.write_jsonl(os.path.join(args.output_dir, "labels.jsonl"),
                        [{"prompt": tok.decode(s["ids"]), "solution": tok.decode(s["comp"]), "labels": s["labels"]}
                         for s in solutions])

    def scores(batch):
        """Solutions right-padded in one forward -> (the logits s_k at every step end, their labels), flat."""
        seqs = [s["ids"] + s["comp"] for s in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in seqs], device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=device)
        at = torch.tensor([(i, len(s["ids"]) + e) for i, s in enumerate(batch) for e in s["ends"]], device=device)
        with dist.autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., 0].float()
        y = torch.tensor([v for s in batch for v in s["labels"]], device=device)
        return logits[at[:, 0], at[:, 1]], y

    def evaluate():
        """{} without held-out solutions; else, over every held-out step against its exact label: step accuracy
        (σ(s_k) > 1/2), the share of the majority label (the accuracy of a constant guess), and the area under the
        ROC curve (how often a right step outscores a wrong one; 1/2 by chance, whatever the labels' balance)."""
        if not held_out:
            return {}
        model.eval()
        per = -(-len(held_out) // world)
        mine = held_out[rank * per:(rank + 1) * per]
        scored = {}
        with torch.no_grad():
            for i in range(0, per, args.batch_size):  # the same number of forwards on every process
                chunk = mine[i:i + args.batch_size]
                s, y = scores(chunk or held_out[:1])
                if chunk:
                    scored[rank * per + i] = list(zip(s.tolist(), y.tolist()))
        model.train()
        s, y = torch.tensor(dist.gather_chunks(scored, world), device="cpu").T
        good = y.mean().item()
        return {"eval/step_accuracy": ((s > 0).float() == y).float().mean().item(),
                "eval/step_majority": max(good, 1 - good), "eval/step_auc": step_auc(s, y)}

    # Loop
    if start == 0 and held_out:
        metrics.log(0, **evaluate())
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc="prm")
    t_log, sums = time.time(), dist.Sums(device)  # sums: the steps scored since the last log, and those ranked right
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        gen = torch.Generator().manual_seed(args.seed + epoch)  # the data order: the same on every process
        order = torch.randperm(len(solutions), generator=gen, device="cpu")
        idx = order[k * G:(k + 1) * G]
        starts = [(i * world + rank) * args.batch_size for i in range(args.grad_accum)]
        micro = [[solutions[j] for j in idx[a:a + args.batch_size].tolist()] for a in starts]
        n_steps = sum(len(solutions[j]["labels"]) for j in idx.tolist())  # S of the equation: the global batch's
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            s, y = scores(batch)
            loss = prm_loss(s, y, n_steps)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.detach()
            sums.add({"right": ((s > 0).float() == (y > 0.5).float()).sum(), "steps": len(y)})
        gnorm = dist.clip_grads(model, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # Log, evaluate, checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            loss_step = dist.all_sum(loss_sum).item()
            if not math.isfinite(loss_step):
                data.fail(f"non-finite loss {loss_step} at step {done}; stopping without saving a model")
            r = sums.reduce()
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, lr=sched.get_last_lr()[0], grad_norm=gnorm.item(),
                        step_accuracy=r["right"] / r["steps"], steps_per_s=r["steps"] / (time.time() - t_log),
                        peak_mem_gb=dist.peak_mem_gb(device), epoch=epoch, **extra)
            t_log, sums = time.time(), dist.Sums(device)
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
