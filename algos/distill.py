r"""Knowledge distillation: a student learns from a frozen teacher that shares its tokenizer.

--mode picks the signal. seqkd: the teacher writes the responses (greedy by default) and the student
is trained on them with the SFT loss. forward_kl: on the data's responses, the per-token KL from the
teacher's next-token distribution to the student's, over the whole vocabulary (mode-covering).
reverse_kl: the same positions, KL(student ‖ teacher) (mode-seeking). on_policy: the student samples
its own responses (KV cache, left padding, no gradient through sampling) and is trained on the
per-token reverse KL to the teacher on them (GKD with λ = 1). gkd: GKD itself: each step's batch is, with
probability λ (--lmbda), the student's own samples, else the data's responses, and the per-token divergence is the
generalised Jensen-Shannon JSD_β (--jsd_beta). With softmax temperature τ and A the response positions,
N = |A| summed over the global batch:

    L(θ) = (τ²/N) Σ_{t ∈ A} KL(p_τ(·|x_<t) ‖ q_τ(·|x_<t)),
    forward: p = teacher, q = student;  reverse: p = student, q = teacher
    gkd: KL(p ‖ q) becomes JSD_β = β·KL(T ‖ M) + (1-β)·KL(S ‖ M), M = β·T + (1-β)·S, T the teacher, S the
         student; β = 0 and 1 are taken as the forward and the reverse KL, the limits of JSD_β/β and
         JSD_β/(1-β), as in TRL

References: Hinton et al. arXiv:1503.02531 (soft targets, τ²); Kim & Rush arXiv:1606.07947 (seqkd);
Agarwal et al. arXiv:2306.13649 (GKD, on-policy reverse KL).
Deviations: 1. seqkd generates the teacher's responses per batch instead of a pass over the data set
   first; with greedy decoding the two are the same data. 2. Logits are compared over the first
   len(tokenizer) entries: models padded to different embedding sizes still distil.
   3. on_policy, as GKD, takes no gradient through the sampling distribution (the samples are data).
   4. Sampling is seeded per micro-batch: samples (and the loss) do not depend on the process count.
Defaults: the student is the SFT model, not the raw base: the reverse KL's gradient on a token scales with
the student's own probability of it, so a student that puts no mass where the teacher does (the base, which
does not know the chat format) barely moves under reverse_kl or on_policy. `kl` is KL(student ‖ teacher) at
τ = 1 per response token in every mode; the teacher's accuracy is logged once at step 0.
Data: JSONL conversations {"messages": [...]} or {"prompt", "completion"} (the KL modes and gkd train on
their responses; seqkd and on_policy use only the prompt: everything before the last assistant
turn), or {"prompt", "answer"} for seqkd and on_policy.
Run:  python algos/sft.py --model runs/toy/base_large --output_dir runs/sft_large   # the teacher
      python algos/distill.py --mode on_policy
      torchrun --nproc_per_node 8 algos/distill.py --teacher Qwen/Qwen2.5-7B-Instruct \
          --model Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, lora, toy  # noqa: E402
from common.models import adamw, load_model, load_tokenizer, start_run  # noqa: E402
from common.packing import fit, pad  # noqa: E402
from common.template import IGNORE, encode_chat, encode_prompt  # noqa: E402


@dataclass
class Args:
    mode: Literal["seqkd", "forward_kl", "reverse_kl", "on_policy", "gkd"] = "forward_kl"  # the signal learnt from
    teacher: str = "runs/sft_large"  # frozen teacher (path or hub name), same tokenizer as the student
    temperature: float = 1.0  # τ: softmax temperature of both distributions in the KL losses
    gen_temperature: float = -1.0  # sampling temperature of generation; 0: greedy; <0: 0 for seqkd, else 1
    lmbda: float = 0.5  # gkd: λ, the probability that a step trains on the student's samples, not the data's
    jsd_beta: float = 0.5  # gkd: β of the generalised JSD (0: forward KL, 1: reverse KL)
    max_new_tokens: int = 16  # response length limit when the teacher (seqkd) or the student (on_policy, gkd) samples
    model: str = "runs/sft"  # the student to train; default: the small SFT model
    data: str = ""  # JSONL of conversations (or prompts for seqkd/on_policy); default: the embedded SFT set
    eval_data: str = ""  # JSONL of {"prompt","answer"}; default: the embedded eval set when --data is not given
    output_dir: str = ""  # model, args.json, metrics.jsonl, checkpoint/; default: runs/distill_<mode>
    max_len: int = 128  # tokens per conversation (longer ones truncated) or prompt (longer ones dropped); counted
    batch_size: int = 32  # conversations (or prompts) per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW); a converged SFT student loses accuracy at 1e-3 before it gains
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    max_steps: int = 200  # optimizer steps; 0: run --epochs over the data
    epochs: int = 1  # passes over the data when max_steps is 0
    warmup_ratio: float = 0.05  # fraction of steps of linear warmup before the cosine decay
    seed: int = 0  # seed of the data order and of every RNG
    log_every: int = 10  # steps between metrics lines
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    eval_every: int = 50  # steps between evaluations (0: only at the end)
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


def kl_per_token(p_logits_NV, q_logits_NV, temperature=1.0, chunk=4096):
    """KL(p_τ ‖ q_τ) = Σ_v p_τ(v) (log p_τ(v) - log q_τ(v)) per row, p_τ = softmax(logits/τ); in row chunks,
    so the fp32 log-softmax of the whole batch never exists at once."""
    out = []
    for i in range(0, max(len(p_logits_NV), 1), chunk):
        logp = F.log_softmax(p_logits_NV[i:i + chunk].float() / temperature, dim=-1)
        logq = F.log_softmax(q_logits_NV[i:i + chunk].float() / temperature, dim=-1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out)


def forward_kl_loss(student_logits_NV, teacher_logits_NV, n_tokens, temperature=1.0):
    """(τ²/N) Σ_t KL(teacher_τ ‖ student_τ): the student must cover every token the teacher gives mass to.
    τ² keeps the gradient's scale independent of τ (Hinton et al. §2)."""
    kl = kl_per_token(teacher_logits_NV.detach(), student_logits_NV, temperature)
    return temperature ** 2 * kl.sum() / max(n_tokens, 1)


def reverse_kl_loss(student_logits_NV, teacher_logits_NV, n_tokens, temperature=1.0):
    """(τ²/N) Σ_t KL(student_τ ‖ teacher_τ): the student puts its mass where the teacher is confident."""
    kl = kl_per_token(student_logits_NV, teacher_logits_NV.detach(), temperature)
    return temperature ** 2 * kl.sum() / max(n_tokens, 1)


def jsd_per_token(s_logits_NV, t_logits_NV, beta, temperature=1.0, chunk=4096):
    """JSD_β = β·KL(T ‖ M) + (1-β)·KL(S ‖ M) per row, M = β·T + (1-β)·S, T and S the teacher's and the
    student's tempered softmaxes, 0 < β < 1; log M by logsumexp, in row chunks as kl_per_token."""
    out = []
    for i in range(0, max(len(s_logits_NV), 1), chunk):
        log_s = F.log_softmax(s_logits_NV[i:i + chunk].float() / temperature, dim=-1)
        log_t = F.log_softmax(t_logits_NV[i:i + chunk].float() / temperature, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), 0)
        kl_t, kl_s = (log_t.exp() * (log_t - log_m)).sum(-1), (log_s.exp() * (log_s - log_m)).sum(-1)
        out.append(beta * kl_t + (1 - beta) * kl_s)
    return torch.cat(out)


def gkd_loss(student_logits_NV, teacher_logits_NV, n_tokens, beta=0.5, temperature=1.0):
    """(τ²/N) Σ_t JSD_β(teacher_τ ‖ student_τ); β = 0: the forward KL, β = 1: the reverse KL (GKD, eq. 1)."""
    if beta == 0:
        return forward_kl_loss(student_logits_NV, teacher_logits_NV, n_tokens, temperature)
    if beta == 1:
        return reverse_kl_loss(student_logits_NV, teacher_logits_NV, n_tokens, temperature)
    jsd = jsd_per_token(student_logits_NV, teacher_logits_NV.detach(), beta, temperature)
    return temperature ** 2 * jsd.sum() / max(n_tokens, 1)


def nll_loss(student_logits_NV, labels_N, n_tokens):
    """seqkd: -(1/N) Σ_t log q(y_t | x, y_<t) on the teacher's tokens, by gather minus logsumexp."""
    picked = student_logits_NV.gather(-1, labels_N[:, None]).squeeze(-1).float()
    logps = picked - torch.logsumexp(student_logits_NV.float(), -1)
    return -logps.sum() / max(n_tokens, 1)


def load_records(path, tok, args):
    """-> conversations (ids, labels) for the KL modes, prompt ids for the generating modes."""
    out = []
    for where, rec in data.read_jsonl(path):
        if args.mode in ("seqkd", "on_policy"):
            if "messages" in rec:
                msgs = data.conversation(rec, where)
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                msgs = msgs[:last]
            else:
                msgs = data.messages(data.field(rec, where, "prompt", (str, list)), where, "prompt", "user")
            ids = encode_prompt(tok, msgs)
            out.append((ids, [IGNORE] * len(ids)))
        else:
            out.append(encode_chat(tok, data.conversation(rec, where)))
    generating = args.mode in ("seqkd", "on_policy")
    docs, n_long = fit(out, args.max_len, truncate=not generating)  # a truncated prompt would lose its assistant header
    if not generating:
        docs = [d for d in docs if any(l != IGNORE for l in d[1][1:])]
    return docs, n_long


def prompt_of(ids, labels):
    """gkd's prompt of a conversation: its tokens before the last labelled response (the assistant header included)."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids[:start]


@torch.no_grad()
def sample_responses(gen_model, prompts, tok, max_new_tokens, temperature, device):
    """Left-padded prompts -> prompt + response, with the KV cache; response tokens after the first
    eos are padding. Labels mark the response (its eos included), so the batch reads like an SFT one."""
    width = max(len(p) for p, _ in prompts)
    x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p, _ in prompts], device=device)
    lengths = torch.tensor([len(p) for p, _ in prompts], device=device)
    mask = torch.arange(width, device=device) >= width - lengths[:, None]  # left padding
    was = gen_model.training
    gen_model.eval()
    with dist.autocast(device), dist.gathered(gen_model):  # FSDP2: gathered once for all tokens, not per token
        out = gen_model.generate(
            input_ids=x, attention_mask=mask.long(), max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced_gpus=dist.rank_world()[1] > 1)
    gen_model.train(was)
    resp = out[:, width:]
    is_eos = resp == tok.eos_token_id
    eos_seen = is_eos.long().cumsum(-1)
    resp_mask = (eos_seen == 0) | ((eos_seen == 1) & is_eos)  # up to and including the first eos
    ids = torch.cat([x, resp.masked_fill(~resp_mask, tok.pad_token_id)], 1)
    labels = torch.cat([torch.full_like(x, IGNORE), resp.masked_fill(~resp_mask, IGNORE)], 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.cat([mask, resp_mask], 1).long()}


def main(args):
    # Setup
    rank, world, device = dist.setup(args.seed)
    gen_t = args.gen_temperature if args.gen_temperature >= 0 else float(args.mode != "seqkd")
    embedded = not args.data  # the embedded task; with a user's --data nothing under runs/toy is built
    args.data = args.data or toy.data("sft.jsonl")
    args.eval_data = args.eval_data or (toy.data("eval.jsonl") if embedded else "")
    args.output_dir = args.output_dir or f"runs/distill_{args.mode}"
    say = tqdm.write if rank == 0 else (lambda *_: None)
    hints = {"teacher": "python algos/sft.py --model runs/toy/base_large --output_dir runs/sft_large",
             "model": "python algos/sft.py"}
    for name in ("lmbda", "jsd_beta"):
        if not 0 <= getattr(args, name) <= 1:
            data.fail(f"--{name} {getattr(args, name)} must lie in [0, 1]")
    for name, hint in hints.items():
        path = getattr(args, name)
        if path == Args.__dataclass_fields__[name].default and not os.path.exists(path):
            data.fail(f"--{name} {path} does not exist; build it first: {hint}")

    # Data and tokenizers, validated before anything is written.
    tok, t_tok = (load_tokenizer(path, args.trust_remote_code) for path in (args.model, args.teacher))
    student_spec = (tok.get_vocab(), tok.eos_token_id, tok.chat_template)
    teacher_spec = (t_tok.get_vocab(), t_tok.eos_token_id, t_tok.chat_template)
    if student_spec != teacher_spec:
        data.fail(f"tokenizers of --model {args.model!r} and --teacher {args.teacher!r} differ "
                  "(vocabulary, eos or chat template); distillation compares their predictions token by token")
    docs, n_long = load_records(args.data, tok, args)
    if not docs:
        data.fail(f"{args.data}: no usable record within max_len={args.max_len}")
    fate = "dropped" if args.mode in ("seqkd", "on_policy") else "truncated"
    say(f"{len(docs)} records; {n_long} longer than max_len={args.max_len} were {fate}")
    eval_recs = data.read_jsonl(args.eval_data) if args.eval_data else []
    eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                 for w, r in eval_recs]
    G = args.batch_size * args.grad_accum * world  # records per optimizer step
    if len(docs) < G:
        data.fail(f"{args.data}: {len(docs)} records, fewer than one global batch of {G}")
    steps_per_epoch = len(docs) // G
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Models: the student trains, the teacher is frozen (eval mode, no gradients); dropout as their configs set it
    model = lora.wrap(load_model(args.model, tok, device, args.trust_remote_code, dropout=True), args)
    teacher = load_model(args.teacher, tok, device, args.trust_remote_code, dropout=True)
    V = len(tok)  # logits compared over the tokenizer's entries (deviation 2)
    teacher.requires_grad_(False)
    if args.gradient_checkpointing:
        dist.gradient_checkpointing(model)  # recompute each layer's activations in backward: less memory
    model, teacher = dist.shard(model, world, device).train(), dist.shard(teacher, world, device).eval()
    opt = adamw(model, args, device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total_steps), total_steps)
    start, metrics, ckpt = start_run(args, model, opt, sched, rank)

    def batch_of(idx, seed, on_policy):
        chunk = [docs[i] for i in idx.tolist()]
        torch.manual_seed(seed)  # samples depend on (step, micro-batch) only, not on the process count
        if args.mode == "seqkd":
            return sample_responses(teacher, chunk, tok, args.max_new_tokens, gen_t, device)
        if args.mode == "on_policy":  # the student's own samples; no gradient flows through sampling
            return sample_responses(model, chunk, tok, args.max_new_tokens, gen_t, device)
        if on_policy:  # gkd: the student's samples of the conversations' prompts
            return sample_responses(model, [(prompt_of(ids, labels), None) for ids, labels in chunk], tok,
                                    args.max_new_tokens, gen_t, device)
        return {k: v.to(device) for k, v in pad(chunk, tok.pad_token_id).items()}

    def evaluate():
        """{} without an eval set; else eval/accuracy (greedy exact match)."""
        if not eval_recs:
            return {}
        return {"eval/accuracy": toy.evaluate(model, tok, eval_recs)}

    # Loop
    if start == 0 and eval_recs:  # the starting point, so every run reports before and after; the teacher's once
        metrics.log(0, **evaluate(), **{"teacher/eval_accuracy": toy.evaluate(teacher, tok, eval_recs)})
    desc = f"distill {args.mode}"
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, disable=rank != 0, desc=desc)
    t_log, tokens = time.time(), 0.0
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        gen = torch.Generator().manual_seed(args.seed + epoch)  # the data order: the same on every process
        order = torch.randperm(len(docs), generator=gen, device="cpu")
        idx = order[k * G:(k + 1) * G]
        mine = [i * world + rank for i in range(args.grad_accum)]  # this process's micro-batches of the step
        micro = {g: idx[g * args.batch_size:(g + 1) * args.batch_size] for g in mine}
        # all samples of the step come from the same student
        # gkd: on-policy with probability λ, a coin by (seed, step): every process and micro-batch samples, or none
        coin = torch.rand((), generator=torch.Generator().manual_seed(args.seed * 10**9 + step), device="cpu").item()
        on_policy = args.mode == "gkd" and coin < args.lmbda
        batches = [batch_of(m, args.seed * 10**9 + step * 10**4 + g, on_policy) for g, m in micro.items()]
        n_labels = sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches)
        n_tokens = dist.all_sum(n_labels).item()  # N of the equation: response tokens of the global batch
        loss_sum, sums = 0.0, dist.Sums(device)  # sums: this step's KL(student ‖ teacher)
        for i, b in enumerate(batches):
            if world > 1:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            # explicit positions: generated batches are left-padded, and a padded forward would otherwise count pads
            pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            mask = b["labels"][:, 1:] != IGNORE  # logits at t predict the token at t+1: response positions only
            fwd = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos, use_cache=False)
            with torch.no_grad(), dist.autocast(device):
                t_logits = teacher(**fwd).logits[:, :-1][mask][:, :V]
            with dist.autocast(device):
                s_logits = model(**fwd).logits[:, :-1][mask][:, :V]
            if args.mode == "seqkd":
                loss = nll_loss(s_logits, b["labels"][:, 1:][mask], n_tokens)
            elif args.mode == "forward_kl":
                loss = forward_kl_loss(s_logits, t_logits, n_tokens, args.temperature)
            elif args.mode == "gkd":
                loss = gkd_loss(s_logits, t_logits, n_tokens, args.jsd_beta, args.temperature)
            else:  # reverse_kl, on_policy
                loss = reverse_kl_loss(s_logits, t_logits, n_tokens, args.temperature)
            (loss * world).backward()  # FSDP2 averages gradients over processes; the equation sums them
            loss_sum += loss.item()
            kl = kl_per_token(s_logits.detach(), t_logits)  # KL(student ‖ teacher) at τ = 1, in every mode
            sums.add({"kl": kl.sum()})
            tokens += b["attention_mask"].sum().item()
        loss_step = dist.all_sum(loss_sum).item()
        if not math.isfinite(loss_step):
            data.fail(f"non-finite loss {loss_step} at step {step + 1}; stopping without saving a model")
        gnorm = dist.clip_grads(model, args.max_grad_norm)  # a tensor on the device: no host sync
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # Log, evaluate, checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            tps = dist.all_sum(tokens).item() / (time.time() - t_log)
            s = sums.reduce()
            eval_now = (args.eval_every and done % args.eval_every == 0) or done == total_steps
            extra = evaluate() if eval_now else {}
            metrics.log(done, loss=loss_step, kl=s["kl"] / max(n_tokens, 1), lr=sched.get_last_lr()[0],
                        grad_norm=gnorm.item(), response_length=n_tokens / G, tokens_per_s=tps,
                        peak_mem_gb=dist.peak_mem_gb(device), **extra)
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
