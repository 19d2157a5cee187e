"""Best-of-N search: sample N solutions to each problem from the policy and keep the one a judge scores highest.

Judges of a solution y to a problem x (its steps' PRM logits s_1..s_K, its final answer a(y)):

    prm_min      max_y min_k σ(s_k)          the process reward model from prm.py, its weakest step
    prm_product  max_y Π_k σ(s_k)            the same, every step's chance of being right together
    prm_last     max_y σ(s_K)                the same, its last step only
    orm          max_y r(x, y)               an outcome reward model from rm.py (pairs of the policy's solutions)
    majority     a solution whose answer a(y) the most solutions give (self-consistency; ties: the first seen)
    verifier     a right solution when there is one: the oracle, best-of-N's ceiling (pass@N)

Accuracy at N: each problem's samples are split into groups of N (64 samples: 64 groups of 1, 16 of 4, 4 of 16, 1 of
64), each judge picks one solution of each group, the verifier checks it, and the accuracy is the mean over groups and
problems. Every judge sees the same samples. Beside it, each learned judge's AUROC (a right solution scored above a
wrong one) within each problem, which is what picking needs, and pooled over all problems, which a judge that knows
only which problems are hard also raises.
References: Cobbe et al., arXiv:2110.14168 (verifiers, best-of-N); Lightman et al., arXiv:2305.20050 (PRM against
ORM, min and product); Wang et al., arXiv:2203.11171 (majority vote).
With --pairs_out it writes the ORM's data instead: --pairs_per_prompt solutions to each prompt of --data, and a pair
(a right one chosen, a wrong one rejected) for each prompt that has both, for algos/rm.py.
Data: JSONL, {"prompt": ..., "answer": ...}; default: the embedded held-out chains (chain_eval.jsonl), and for
--pairs_out the embedded multi-step prompts (chain_rl.jsonl).
Run:  python algos/best_of_n.py --pairs_out runs/orm_pairs.jsonl    # then python algos/rm.py --model runs/sft_chain
          --data runs/orm_pairs.jsonl --output_dir runs/orm, and algos/prm.py for runs/prm, then:
      python algos/best_of_n.py
"""
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import data, dist, toy  # noqa: E402
from common.models import load_config, load_model, load_tokenizer  # noqa: E402
from common.sampling import generate  # noqa: E402
from common.template import encode_prompt, step_ends  # noqa: E402


@dataclass
class Args:
    policy: str = "runs/sft_chain"  # the model whose samples are searched
    prm: str = "runs/prm"  # process reward model (algos/prm.py)
    orm: str = "runs/orm"  # outcome reward model (algos/rm.py); "" leaves the ORM out
    data: str = ""  # JSONL of {"prompt", "answer"}; default: the embedded held-out chains
    n: str = "1,4,16,64"  # the N compared; the largest is the number of samples drawn per problem
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 48  # length limit of a solution
    gen_batch_size: int = 32  # prompts per generate call
    batch_size: int = 64  # solutions per scoring forward
    seed: int = 0  # seed of the sampling
    output_dir: str = "runs/best_of_n"  # best_of_n.json (accuracy per judge and N), best_of_n.md, args.json
    pairs_out: str = ""  # instead: write the ORM's preference pairs to this JSONL (from --data, default chain_rl)
    pairs_per_prompt: int = 4  # solutions sampled per prompt for --pairs_out
    num_prompts: int = 2048  # prompts used for --pairs_out (0: all)
    trust_remote_code: bool = False  # allow model code from the hub to run


def prm_scores(step_logits_K):
    """A solution's three PRM scores from its steps' logits s_k: min_k σ(s_k), Π_k σ(s_k), σ(s_K)."""
    p = torch.sigmoid(step_logits_K.float())
    return {"prm_min": p.min().item(), "prm_product": p.prod().item(), "prm_last": p[-1].item()}


def final_answer(text):
    """The last integer in a solution (what the verifier checks), or None."""
    nums = re.findall(r"-?\d+", text)
    return nums[-1] if nums else None


def majority_pick(answers):
    """Index of the first solution whose final answer is the most common one (None, no number, counts as an answer
    nobody can be right with, so it wins only when every solution lacks one)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def majority_accuracy(n, answers, right_PS):
    """Accuracy at n of majority vote: in each group of n samples, the verifier's outcome of majority_pick's choice."""
    P, S = right_PS.shape
    hits = [right_PS[p, g + majority_pick(answers[p][g:g + n])].item() for p in range(P) for g in range(0, S, n)]
    return sum(hits) / len(hits)


def auroc(scores, right):
    """P(score of a right solution > score of a wrong one), ties 1/2 (Mann-Whitney); None when either is missing."""
    pos, neg = scores[right > 0.5], scores[right <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def discrimination(scores_PS, right_PS):
    """A judge's AUROC within each problem (what picking among one problem's samples needs), averaged over the
    problems with both right and wrong samples, and pooled over every sample of every problem (which a judge that
    only knows which problems are hard also gets above 1/2)."""
    within = [a for a in (auroc(s, r) for s, r in zip(scores_PS, right_PS)) if a is not None]
    return {"within": sum(within) / len(within) if within else None, "pooled": auroc(scores_PS.flatten(),
                                                                                      right_PS.flatten())}


def accuracy_at(n, scores_PS, right_PS):
    """Mean verifier outcome of the judge's pick (its highest score; ties: the first) in each group of n samples:
    scores and outcomes [problems, samples], the samples split into samples // n groups."""
    P, S = right_PS.shape
    g_scores, g_right = scores_PS[:, :S // n * n].view(P, -1, n), right_PS[:, :S // n * n].view(P, -1, n)
    pick = g_scores.argmax(-1, keepdim=True)
    return g_right.gather(-1, pick).float().mean().item()


@torch.no_grad()
def sample(policy, recs, k, tok, gen_cfg, args, device):
    """k solutions to each record's prompt -> [[token ids of each solution] per record], seeded by chunk."""
    out = []
    for c, i in enumerate(tqdm(range(0, len(recs), args.gen_batch_size), desc="sample", leave=False)):
        torch.manual_seed(args.seed * 10**6 + c)
        comp, mask, _ = generate(policy, [r["ids"] for r in recs[i:i + args.gen_batch_size]], k, tok, gen_cfg,
                                 device)
        rows = [ids[:sum(m)] for ids, m in zip(comp.tolist(), mask.tolist())]
        out += [rows[j:j + k] for j in range(0, len(rows), k)]
    return out


@torch.no_grad()
def forward_scores(model, seqs, tok, args, device, read_at):
    """Right-padded forwards in batches; read_at(i, logits of sequence i) -> its score(s)."""
    out = []
    for i in range(0, len(seqs), args.batch_size):
        chunk = seqs[i:i + args.batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in chunk], device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in chunk], device=device)
        with dist.autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        out += [read_at(i + j, logits[j]) for j in range(len(chunk))]
    return out


def write_pairs(policy, tok, gen_cfg, args, device):
    recs = [{"ids": encode_prompt(tok, [{"role": "user", "content": data.field(r, w, "prompt", str)}]),
             "prompt": r["prompt"], "answer": data.field(r, w, "answer", str)} for w, r in data.read_jsonl(args.data)]
    recs = recs[:args.num_prompts or len(recs)]
    pairs = []
    for r, sols in zip(recs, sample(policy, recs, args.pairs_per_prompt, tok, gen_cfg, args, device)):
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in sols]
        right = [t for t in texts if toy.verify(t, r["answer"])]
        wrong = [t for t in texts if not toy.verify(t, r["answer"])]
        if right and wrong:
            pairs.append({"prompt": r["prompt"], "chosen": right[0], "rejected": wrong[0]})
    if not pairs:
        data.fail(f"no prompt of {args.data} got both a right and a wrong solution: no pairs to write")
    toy.write_jsonl(args.pairs_out, pairs)
    print(f"wrote {len(pairs)} pairs ({len(recs)} prompts, {args.pairs_per_prompt} solutions each) to "
          f"{args.pairs_out}")


def main(args):
    # Setup: one process (search is inference; run several with different --seed for more samples)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns = [int(x) for x in args.n.split(",") if x.strip()]
    if not ns or min(ns) < 1 or any(max(ns) % n for n in ns):
        data.fail(f"--n {args.n}: every N must be a positive divisor of the largest")
    if args.pairs_out and args.pairs_per_prompt < 2:
        data.fail(f"--pairs_per_prompt {args.pairs_per_prompt}: a pair needs at least 2 solutions per prompt")
    models = [args.policy] if args.pairs_out else [args.policy, args.prm] + ([args.orm] if args.orm else [])
    for path in models:  # checked before minutes of sampling: a missing judge fails now, in one line
        if path.startswith("runs/") and not os.path.exists(path):
            data.fail(f"{path} not found: train it first (see algos/best_of_n.py's Run lines), or pass its flag")
        load_config(path, args.trust_remote_code)
    args.data = args.data or toy.data("chain_rl.jsonl" if args.pairs_out else "chain_eval.jsonl")
    tok = load_tokenizer(args.policy, args.trust_remote_code)
    gen_cfg = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                               max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    policy = load_model(args.policy, tok, device, args.trust_remote_code).to(device).eval()
    if args.pairs_out:
        return write_pairs(policy, tok, gen_cfg, args, device)
    recs = [{"ids": encode_prompt(tok, [{"role": "user", "content": data.field(r, w, "prompt", str)}]),
             "answer": data.field(r, w, "answer", str)} for w, r in data.read_jsonl(args.data)]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)

    # Sample: the largest N solutions to every problem, checked by the verifier
    t0, S = time.time(), max(ns)
    sols = sample(policy, recs, S, tok, gen_cfg, args, device)
    del policy
    texts = [[tok.decode(ids, skip_special_tokens=True) for ids in row] for row in sols]
    right = torch.tensor([[toy.verify(t, r["answer"]) for t in row] for r, row in zip(recs, texts)], device="cpu")
    flat = [(r["ids"], ids) for r, row in zip(recs, sols) for ids in row]

    # Judge: every solution's scores
    judges = {}
    prm = load_model(args.prm, tok, device, args.trust_remote_code, cls=AutoModelForTokenClassification,
                     num_labels=1).to(device).eval()
    ends = [[len(q) + e for e in step_ends(tok, c)] for q, c in flat]
    per = forward_scores(prm, [q + c for q, c in flat], tok, args, device,
                         lambda i, logits: prm_scores(logits[ends[i], 0]))
    for how in ("prm_min", "prm_product", "prm_last"):
        judges[how] = torch.tensor([s[how] for s in per], device="cpu").view(len(recs), S)
    del prm
    if args.orm:
        orm = load_model(args.orm, tok, device, args.trust_remote_code, cls=AutoModelForSequenceClassification,
                         num_labels=1).to(device).eval()
        # rm.py's head reads the last non-pad token: the solution's end-of-turn token, as in its training pairs
        judges["orm"] = torch.tensor(forward_scores(orm, [q + c for q, c in flat], tok, args, device,
                                                    lambda i, logits: logits[0].item()),
                                     device="cpu").view(len(recs), S)
        del orm
    judges["verifier"] = right.float()
    answers = [[final_answer(t) for t in row] for row in texts]

    # Accuracy at each N, per judge
    table = {}
    for name, sc in judges.items():
        table[name] = {n: accuracy_at(n, sc, right) for n in ns}
    table["majority"] = {n: majority_accuracy(n, answers, right) for n in ns}
    auc = {name: discrimination(sc, right) for name, sc in judges.items() if name != "verifier"}
    result = {"n": ns, "problems": len(recs), "accuracy": table, "sample_accuracy": right.float().mean().item(),
              "auroc": auc, "time_s": time.time() - t0}
    with open(os.path.join(args.output_dir, "best_of_n.json"), "w") as f:
        json.dump(result, f, indent=1)
    show = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| judge | " + " | ".join(f"N = {n}" for n in ns) + " | AUROC within a problem | pooled |",
             "|---" * (len(ns) + 3) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{acc[n]:.3f}" for n in ns) + f" | {show(auc.get(name, {}).get('within'))}"
              f" | {show(auc.get(name, {}).get('pooled'))} |" for name, acc in table.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "best_of_n.md"), "w") as f:
        f.write(text)
    print(text)


def parse_args(argv=None):
    return data.parse(Args, argv)


if __name__ == "__main__":
    main(parse_args())
