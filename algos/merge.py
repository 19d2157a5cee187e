r"""Model merging: combine the weights of models that share an architecture and a tokenizer, no training.

Each tensor is merged on its own. With task vectors τ_i = θ_i - θ_base (models fine-tuned from one base):
  linear           θ = (1-α) θ_base + α Σ_i w_i θ_i  (WiSE-FT)
                   without --base: the average θ = Σ_i w_i θ_i; the w_i normalised to sum to 1 in both
  slerp            θ = sin((1-α)Ω)/sin Ω · θ_a + sin(αΩ)/sin Ω · θ_b,
                   cos Ω = ⟨θ_a, θ_b⟩/(‖θ_a‖‖θ_b‖)
  task_arithmetic  θ = θ_base + λ Σ_i w_i τ_i
  ties             trim each w_i τ_i to its top --density fraction by magnitude, elect γ = sign(Σ_i τ̂_i), then
                   θ = θ_base + λ · mean of the τ̂_i whose sign agrees with γ (entry by entry)
  dare             τ̂_i = m ⊙ τ_i / (1-p),  m ~ Bernoulli(1-p) (seeded), then task arithmetic on the τ̂_i

    WiSE-FT sweep (--sweep): θ(α) = (1-α) θ_base + α θ_ft for α in --alphas, each scored by eval/accuracy and
    by the perplexity of plain task text (a base capability): the alignment tax against α.

References: WiSE-FT arXiv:2109.01903; task arithmetic arXiv:2212.04089; TIES arXiv:2306.01708;
DARE arXiv:2311.03099; SLERP for weights: Shoemake 1985 (as in mergekit).
Deviations: 1. SLERP falls back to linear when |cos Ω| > 1 - 1e-6 (nearly parallel tensors: the formula is 0/0).
   2. TIES and DARE take optional per-model weights w_i (the papers use 1); λ defaults to 1.
The merged model is saved in the first input's dtype (--dtype to choose): the arithmetic runs in float32.
Data: Hugging Face model directories or hub names; --eval_data JSONL {"prompt","answer"};
   --ppl_data plain text, one document per line.
Run:  python algos/merge.py --sweep --base runs/sft --models runs/grpo --output_dir runs/merge_wiseft
      python algos/merge.py --method ties --base runs/toy/base --models runs/sft_add runs/sft_sub \
          --output_dir runs/merge_ties
"""
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Literal

import torch
from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.models import load_model  # noqa: E402


@dataclass
class Args:
    models: list[str] = field(default_factory=lambda: ["runs/grpo"])  # models to merge (paths or hub names)
    base: str = "runs/sft"  # θ_base: the α=0 end of linear/slerp, the origin of task vectors; "" for none
    method: Literal["linear", "slerp", "task_arithmetic", "ties", "dare"] = "linear"  # how the weights are combined
    weights: list[float] = field(default_factory=list)  # w_i per model; default: 1/n (linear), 1 (task vectors)
    alpha: float = 0.5  # α: interpolation from the base (linear, slerp); the merged model saved by --sweep
    scale: float = 1.0  # λ: scale of the merged task vector (task_arithmetic, ties, dare)
    density: float = 0.5  # ties: fraction of each task vector's entries kept (largest magnitudes)
    drop: float = 0.5  # dare: probability p of dropping a task-vector entry
    sweep: bool = False  # WiSE-FT sweep of --method over --alphas, scored, printed and plotted to wiseft.png
    alphas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])  # α values of the sweep
    eval_data: str = ""  # JSONL of {"prompt","answer"}; default: the embedded eval set
    eval_groups: list[str] = field(default_factory=lambda: ["add:+", "sub:-"])  # name:substring -> eval/accuracy_name
    ppl_data: str = ""  # plain text, one document per line, for eval/perplexity; default: the embedded plain_eval.txt
    output_dir: str = "runs/merge"  # merged model + tokenizer, args.json, metrics.jsonl
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # of the saved model; auto: the first input's
    seed: int = 0  # seed of dare's drop masks
    report_to: str = "none"  # also log metrics to tensorboard (output_dir/tensorboard), wandb or trackio
    trust_remote_code: bool = False  # allow model code from the hub to run


def merge_weights(method, weights, n):
    """w_i: as given, else 1/n (linear) or 1 (task vectors). Linear's are normalised to sum to 1, so that the merge
    is an average (and WiSE-FT an interpolation) whatever scale they were written in; task vectors keep their w_i,
    which scale them on purpose (as λ does)."""
    if not weights:
        return [1.0 / n if method == "linear" else 1.0] * n
    if method != "linear":
        return list(weights)
    if sum(weights) <= 0:
        data.fail("--weights of --method linear must have a positive sum")
    return [w / sum(weights) for w in weights]


def linear(tensors, weights):
    """Σ_i w_i θ_i."""
    return sum(w * t.float() for w, t in zip(weights, tensors))


def slerp(a, b, t, eps=1e-6):
    """Spherical interpolation of flattened tensors by the angle between them; linear when nearly parallel."""
    a32, b32 = a.float(), b.float()
    cos = (a32.flatten() @ b32.flatten()) / (a32.norm() * b32.norm()).clamp(min=1e-12)
    if cos.abs() > 1 - eps:
        return (1 - t) * a32 + t * b32
    omega = torch.arccos(cos.clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a32 + torch.sin(t * omega) * b32) / torch.sin(omega)


def task_arithmetic(base, tensors, weights, scale=1.0):
    """θ_base + λ Σ_i w_i (θ_i - θ_base)."""
    return base.float() + scale * sum(w * (t.float() - base.float()) for w, t in zip(weights, tensors))


def trim(tau, density):
    """Keep the ⌈density·n⌉ entries of largest magnitude, zero the rest (TIES step 1). density is read as the
    decimal it was written as: its float times n can land just above a whole number (0.55 x 6400 =
    3520.0000000000005)."""
    k = math.ceil(Fraction(repr(density)) * tau.numel())
    if k >= tau.numel():
        return tau
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view_as(tau)


def ties(base, tensors, weights, density=0.5, scale=1.0):
    """TIES: trim, elect the sign of the summed trimmed vectors (its total mass), disjoint mean of agreeing entries."""
    taus = torch.stack([trim(w * (t.float() - base.float()), density) for w, t in zip(weights, tensors)])
    sign = torch.sign(taus.sum(0))  # γ: the sign carrying more total magnitude
    agree = (torch.sign(taus) == sign) & (taus != 0)
    merged = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)  # mean over the models that agree, 0 where none
    return base.float() + scale * merged


def dare(base, tensors, weights, drop=0.5, scale=1.0, generator=None):
    """DARE: drop each entry with probability p, rescale survivors by 1/(1-p) (so E[τ̂] = τ), then task
    arithmetic. The drop masks come from the CPU generator, so a seed gives the same merge on any device."""
    out = base.float().clone()
    for w, t in zip(weights, tensors):
        tau = t.float() - base.float()
        keep = torch.rand(tau.shape, generator=generator, device="cpu") >= drop
        out += scale * w * tau * keep.to(tau.device) / (1 - drop)
    return out


def merge_state_dicts(method, state_dicts, base_sd, weights, args):
    """Every floating tensor merged by `method`; other tensors (integer buffers) taken from the first model."""
    gen = torch.Generator().manual_seed(args.seed)
    out = {}
    for name in sorted(state_dicts[0]):
        ts, b = [sd[name] for sd in state_dicts], base_sd[name] if base_sd is not None else None
        if not ts[0].is_floating_point():
            out[name] = ts[0].clone()
            continue
        if method == "linear" and b is None:
            m = linear(ts, weights)
        elif method == "linear":
            m = (1 - args.alpha) * b.float() + args.alpha * linear(ts, weights)
        elif method == "slerp":
            a, c = (b, ts[0]) if b is not None else ts
            m = slerp(a, c, args.alpha)
        elif method == "task_arithmetic":
            m = task_arithmetic(b, ts, weights, args.scale)
        elif method == "ties":
            m = ties(b, ts, weights, args.density, args.scale)
        else:
            m = dare(b, ts, weights, args.drop, args.scale, gen)
        out[name] = m.to(ts[0].dtype)
    return out


def load(paths, args):
    """-> (models, tokenizer, the first's dtype); refuses architectures, tensor names or shapes, or tokenizers that
    differ, in one line."""
    cfgs, toks, models = [], [], []
    for p in paths:
        try:
            cfgs.append(AutoConfig.from_pretrained(p, trust_remote_code=args.trust_remote_code))
            toks.append(AutoTokenizer.from_pretrained(p, trust_remote_code=args.trust_remote_code))
        except (OSError, ValueError) as e:
            data.fail(f"cannot load {p!r}: {str(e).splitlines()[0]}")
    for p, c, t in zip(paths[1:], cfgs[1:], toks[1:]):
        if (c.model_type, c.architectures) != (cfgs[0].model_type, cfgs[0].architectures):
            theirs = f"{cfgs[0].model_type}/{cfgs[0].architectures}"
            data.fail(f"{p}: architecture {c.model_type}/{c.architectures} differs from {paths[0]}'s {theirs}")
        if t.get_vocab() != toks[0].get_vocab() or t.chat_template != toks[0].chat_template:
            data.fail(f"{p}: tokenizer (vocabulary or chat template) differs from {paths[0]}'s")
    for p in paths:  # sdpa, transformers' default, on any device; dropout=True: the config is saved as loaded
        models.append(load_model(p, toks[0], torch.device("cpu"), args.trust_remote_code, attn="sdpa", dropout=True))
    sds = [m.state_dict() for m in models]
    for p, sd in zip(paths[1:], sds[1:]):
        if sd.keys() != sds[0].keys():
            diff = sorted(set(sd) ^ set(sds[0]))
            data.fail(f"{p}: tensor names differ from {paths[0]}'s (e.g. {diff[0]!r})")
        for name, t in sd.items():
            if t.shape != sds[0][name].shape:
                first = tuple(sds[0][name].shape)
                data.fail(f"{p}: tensor {name!r} has shape {tuple(t.shape)}, {paths[0]} has {first}")
    dtype = getattr(cfgs[0], "dtype", None) or getattr(cfgs[0], "torch_dtype", None) or "float32"
    return models, toks[0], str(dtype).replace("torch.", "")


@torch.no_grad()
def perplexity(model, tok, lines, batch_size=64):
    """exp of the mean next-token NLL over every token of each line but its first (a base-model capability)."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(lines), batch_size):
        enc = [tok(ln, add_special_tokens=False)["input_ids"] for ln in lines[i:i + batch_size]]
        width = max(map(len, enc))
        x = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc], device=model.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=model.device)
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        logps = logits.gather(-1, x[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        nll -= (logps * mask[:, 1:]).sum().item()
        n += mask[:, 1:].sum().item()
    return math.exp(nll / max(n, 1))


def score(model, tok, eval_recs, groups, lines, device):
    """eval/accuracy overall and per group of prompts, eval/perplexity on plain text (on the accelerator if any)."""
    model.to(device)
    out = {"eval/accuracy": toy.evaluate(model, tok, eval_recs)}
    for name, sub in groups:
        recs = [r for r in eval_recs if sub in r["prompt"]]
        if recs:
            out[f"eval/accuracy_{name}"] = toy.evaluate(model, tok, recs)
    out["eval/perplexity"] = perplexity(model, tok, lines)
    model.cpu()  # merging happens on the CPU, where every state dict lives
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(a, [r["eval/accuracy"] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("α  (0: --base, 1: --models)")
    ax.set_ylabel("eval/accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(a, [r["eval/perplexity"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("perplexity of plain task text", color="tab:red")
    if max(r["eval/perplexity"] for r in rows) > 10 * min(r["eval/perplexity"] for r in rows):
        ax2.set_yscale("log")
    ax.set_title("WiSE-FT: accuracy vs base capability")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def main(args):
    # Setup
    _, _, device = dist.setup(args.seed)
    if args.method in ("task_arithmetic", "ties", "dare") and not args.base:
        data.fail(f"--method {args.method} needs --base (task vectors are θ_i - θ_base)")
    if args.method == "slerp" and len(args.models) + bool(args.base) != 2:
        data.fail("--method slerp interpolates exactly two models: --base and one --models, or two --models")
    if args.sweep and (args.method not in ("linear", "slerp") or not args.base):
        data.fail("--sweep interpolates from --base: use --method linear or slerp with --base")
    if args.weights and len(args.weights) != len(args.models):
        data.fail(f"--weights has {len(args.weights)} values for {len(args.models)} models")
    if not 0 < args.density <= 1 or not 0 <= args.drop < 1:
        data.fail("--density must be in (0, 1] and --drop in [0, 1)")
    for p in args.models + [args.base]:
        if p in ("runs/grpo", "runs/sft") and not os.path.exists(p):
            script = f"algos/{os.path.basename(p)}.py"
            data.fail(f"{p} does not exist: build it first (python {script}) or pass another path")
    weights = merge_weights(args.method, args.weights, len(args.models))

    # Data: the held-out prompts and the plain text that score each model
    eval_recs = [{"prompt": data.field(r, w, "prompt", str), "answer": data.field(r, w, "answer", str)}
                 for w, r in data.read_jsonl(args.eval_data or toy.data("eval.jsonl"))]
    groups = [tuple(g.split(":", 1)) for g in args.eval_groups if ":" in g]
    with open(args.ppl_data or toy.data("plain_eval.txt"), encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]

    # Models: loaded and checked before anything is written; the base (if any) first, so each is compared to it.
    paths = ([args.base] if args.base else []) + args.models
    models, tok, input_dtype = load(paths, args)
    first = {k: v.clone() for k, v in models[0].state_dict().items()}  # a copy: models[0] gets overwritten
    sds = [first] + [m.state_dict() for m in models[1:]]
    base_sd, sds = (sds[0], sds[1:]) if args.base else (None, sds)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out_model = models[0]

    # Merge, and score the inputs and the result
    rows = []
    for p, m in zip(paths, models):  # the inputs' own scores: the ends of the sweep, the parts of a merge
        rows.append({"model": p, **score(m, tok, eval_recs, groups, lines, device)})
    if args.sweep:
        for a in args.alphas:
            out_model.load_state_dict(merge_state_dicts(args.method, sds, base_sd, weights, replace(args, alpha=a)))
            rows.append({"alpha": a, **score(out_model, tok, eval_recs, groups, lines, device)})
    merged = merge_state_dicts(args.method, sds, base_sd, weights, args)
    out_model.load_state_dict(merged)
    rows.append({"model": "merged", "method": args.method, **score(out_model, tok, eval_recs, groups, lines, device)})

    # Log
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = data.Metrics(args.output_dir, True, report_to=args.report_to, config=asdict(args))
    for i, r in enumerate(rows):
        metrics.log(i, **r)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    if args.sweep:
        sweep = [r for r in rows if "alpha" in r]
        print("alpha  eval/accuracy  eval/perplexity")
        for r in sweep:
            print(f"{r['alpha']:5.2f}  {r['eval/accuracy']:13.3f}  {r['eval/perplexity']:15.3f}")
        plot(sweep, os.path.join(args.output_dir, "wiseft.png"))

    # Save
    out_model.generation_config.pad_token_id = tok.pad_token_id
    out_model.to(getattr(torch, input_dtype if args.dtype == "auto" else args.dtype))
    dist.save_model(out_model, tok, args.output_dir, 0)  # files moved into place, config.json last
    print(f"saved {args.output_dir}")


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
