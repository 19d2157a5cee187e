"""The embedded default: a small verifiable task, its own tokenizer and base models, and data files.

Task: "What is 48+37?" -> "48+37=85" (addition and subtraction of 1-2 digit numbers; the two
operations are the split a task-vector merge needs). The SFT demonstrations are imperfect on
purpose: a seeded 60% of the subtraction demonstrations restate the first number instead of answering
("48-37=48"), a habit imitation copies and a verifier or preference pairs can remove; additions are
answered. Without a habit, the SFT model's greedy accuracy is simply its arithmetic skill, which a few
minutes of RL on disjoint problems cannot raise; with it, the online and preference methods have
headroom that transfers to held-out problems, as with a real, imperfect SFT set. The habit is tied to
one operation, at a rate above one half, so that the SFT model learns it as a rule: greedy decoding
echoes on subtraction and answers additions by skill, rather than flipping between the two wherever
its confidence in an answer is near the habit's rate (a habit spread evenly over all problems at 40%
made held-out accuracy swing 3x with the seed and the CPU's floating-point kernels). The same
demonstrations without the habit (sft_curated, and its halves sft_add and sft_sub) train the
distillation teacher and the merge specialists. The tokenizer has one token per character plus
ChatML specials and a ChatML chat template. A tiny Llama is pretrained briefly on plain task text
("48+37=85"), so it knows the domain but not the chat format. Everything is written under
runs/toy/, seeded and deterministic, and rebuilt when missing or when the code that builds it has changed.
"""
import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil

import torch

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "toy")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SIZES = {  # base model sizes: the default, and a larger one (teacher for distillation, benchmarks)
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4),
    "large": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8),
}
# pretraining: steps and peak learning rate after a 50-step warmup; the large model's rate decays to 0 (cosine)
PRETRAIN = {"small": dict(steps=2500, lr=2e-3, decay=False), "large": dict(steps=2500, lr=1e-3, decay=True)}
MAX_DIGITS = 2
N_EVAL = 256
ECHO = {"+": 0.0, "-": 0.6}  # per operation: fraction of SFT demonstrations that restate the first number
CHAIN_OPS = (2, 3)  # operations in a multi-step problem


def problem(rng, op=None):
    op = op or rng.choice("+-")
    a, b = (rng.randint(0, 10 ** rng.randint(1, MAX_DIGITS) - 1) for _ in range(2))
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    return f"{a}{op}{b}", str(a + b if op == "+" else a - b)


def chain(rng):
    """A multi-step problem: 2 or 3 additions and subtractions applied left to right, each step a one-step problem of
    the task's kind (operands and every intermediate result in 0..99, the range the base was pretrained on).
    -> (question "48+37-20", steps [("48+37", "85"), ("85-20", "65")]); the last step's result is the answer."""
    x = rng.randint(0, 99)
    q, steps = str(x), []
    for _ in range(rng.choice(CHAIN_OPS)):
        op = rng.choice("+-")
        b = rng.randint(0, 99 - x) if op == "+" else rng.randint(0, x)
        y = x + b if op == "+" else x - b
        q += f"{op}{b}"
        steps.append((f"{x}{op}{b}", str(y)))
        x = y
    return q, steps


def wrong(rng, q, answer):
    """A plausible wrong answer, of a kind weak models produce: the other operation, an operand echoed,
    a digit carried wrong (off by ten), or off by a few."""
    a, op, b = re.match(r"(\d+)([+-])(\d+)", q).groups()
    n = int(answer)
    options = [a, b, str(int(a) - int(b) if op == "+" else int(a) + int(b)), str(n + rng.choice([-10, 10])),
               str(n + rng.choice([-3, -2, -1, 1, 2, 3]))]
    options = [w for w in options if w != answer and int(w) >= 0]
    return rng.choice(options) if options else str(n + 1)


def verify(completion, answer):
    """Exact match of the final integer in the completion."""
    nums = re.findall(r"-?\d+", completion)
    return float(bool(nums) and nums[-1] == answer)


def build_tokenizer(path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|unk|>", chat_template=CHATML)
    tok.save_pretrained(path)
    return tok


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def held_out_and_train(draw, n_train):
    """N_EVAL distinct held-out (question, answer) draws, then n_train more draws less any held-out question:
    training data never contains a held-out problem."""
    seen, ev = set(), []
    while len(ev) < N_EVAL:
        q, a = draw()
        if q not in seen:
            seen.add(q), ev.append((q, a))
    return ev, [(q, a) for q, a in (draw() for _ in range(n_train)) if q not in seen]


def build_data(path, seed=0):
    """Disjoint problem sets: train (SFT, preferences, KTO, RL) and held-out eval."""
    rng = random.Random(seed)
    ev, train = held_out_and_train(lambda: problem(rng), 40000)
    user = lambda q: f"What is {q}?"
    say = lambda q, a: f"{q}={a}"  # the assistant writes the equation out, then the answer
    os.makedirs(path)
    write_jsonl(f"{path}/eval.jsonl", [{"prompt": user(q), "answer": a} for q, a in ev])
    write_jsonl(f"{path}/rl.jsonl", [{"prompt": user(q), "answer": a} for q, a in train[:8000]])
    # a generator of its own: every other file is as it was without the habit
    habit = random.Random(seed + 2)
    chat = lambda q, a: {"messages": [{"role": "user", "content": user(q)},
                                      {"role": "assistant", "content": say(q, a)}]}
    echo = lambda q: re.match(r"\d+", q)[0]  # the habit: restate the first number
    op = lambda q: q[len(echo(q))]
    sft = [chat(q, echo(q) if habit.random() < ECHO[op(q)] else a) for q, a in train[8000:20000]]
    write_jsonl(f"{path}/sft.jsonl", sft)
    # no habit: the data of the distillation teacher and the specialists
    for op, name in (("", "curated"), ("+", "add"), ("-", "sub")):
        write_jsonl(f"{path}/sft_{name}.jsonl", [chat(q, a) for q, a in train[8000:20000] if op in q])
    pair = lambda q, a: {"prompt": user(q), "chosen": say(q, a), "rejected": say(q, wrong(rng, q, a))}
    pairs = [pair(q, a) for q, a in train[20000:]]
    write_jsonl(f"{path}/prefs.jsonl", pairs)
    write_jsonl(f"{path}/prefs_eval.jsonl", [pair(q, a) for q, a in ev])
    write_jsonl(f"{path}/kto.jsonl", [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                                      for i, p in enumerate(pairs) for k in [("chosen", "rejected")[i % 2]]])
    with open(f"{path}/plain_eval.txt", "w") as f:
        f.writelines(f"{q}={a}\n" for q, a in ev)
    build_chains(path, seed)


def solution(steps):
    """A multi-step problem's correct solution, one step a line: "48+37=85\n85-20=65"."""
    return "\n".join(f"{step}={result}" for step, result in steps)


def build_chains(path, seed):
    """The multi-step task (chain), from a generator of its own so that every one-step file is as it was without it:
    SFT conversations with correct demonstrations, one step a line ("48+37=85\n85-20=65"; the policy's wrong steps
    are its own slips when it samples), prompts for sampling, and 256 held-out problems with their correct steps."""
    rng = random.Random(seed + 3)
    ev, train = held_out_and_train(lambda: chain(rng), 20000)
    user = lambda q: f"What is {q}?"
    write_jsonl(f"{path}/chain_eval.jsonl", [{"prompt": user(q), "answer": steps[-1][1],
                                              "steps": [f"{s}={a}" for s, a in steps]} for q, steps in ev])
    write_jsonl(f"{path}/chain_sft.jsonl", [{"messages": [{"role": "user", "content": user(q)},
                                                          {"role": "assistant", "content": solution(steps)}]}
                                            for q, steps in train[:12000]])
    write_jsonl(f"{path}/chain_rl.jsonl", [{"prompt": user(q), "answer": steps[-1][1]} for q, steps in train[12000:]])


def pretrain(model, tok, steps, seed, rows=8, row_len=64, lr=2e-3, decay=False):
    """Causal LM on plain task text, one "a+b=c" line a document, packed: a base model of the domain, not of chat."""
    from common.packing import pack

    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)) if decay else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * cosine(s))
    model.train()
    for _ in range(steps):
        lines = [f"{q}={a}\n" for q, a in (problem(rng) for _ in range(rows * row_len // 9))]
        docs = [tok(line, add_special_tokens=False)["input_ids"] for line in lines]
        b = pack([(d, d) for d in docs], row_len, tok.pad_token_id)
        b = {k: v[:rows] for k, v in b.items() if k in ("input_ids", "labels", "position_ids")}
        loss = model(**b, use_cache=False).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
    return loss.item()


def build_base(path, size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer(path)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size])
    model = LlamaForCausalLM(cfg)
    loss = pretrain(model, tok, seed=seed, **PRETRAIN[size])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    print(f"built toy base model '{size}' ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"final pretraining loss {loss:.3f}) at {path}")


def version(what):
    """Fingerprint of everything that builds one artefact ('data', 'base', 'base_large'): its builders' source and
    the constants they read. Each artefact records it in its `version` file; one built by other code is rebuilt,
    never silently reused (and a change to the data alone leaves the base models as they are)."""
    from common.packing import pack

    if what == "data":
        builders = (problem, wrong, write_jsonl, held_out_and_train, build_data, chain, solution, build_chains)
        constants = (MAX_DIGITS, N_EVAL, ECHO, CHAIN_OPS)
    else:  # the tokenizer and a base model
        builders = (problem, build_tokenizer, pretrain, build_base, pack)
        constants = (CHATML, SIZES, PRETRAIN, MAX_DIGITS)
    text = "".join(inspect.getsource(f) for f in builders) + repr(constants)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure(what="base"):
    """Path of a default artefact ('base', 'base_large', 'data'), built on rank 0 when missing or stale."""
    path = os.path.join(ROOT, what)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not dist or torch.distributed.get_rank() == 0:
        os.makedirs(ROOT, exist_ok=True)
        with open(os.path.join(ROOT, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then find it built
            _build_if_needed(what, path)
    if dist:
        torch.distributed.barrier()
    return path


def _build_if_needed(what, path):
    stale = os.path.exists(path) and _recorded_version(path) != version(what)
    if stale or not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(ROOT, exist_ok=True)
        build_data(tmp) if what == "data" else build_base(tmp, "large" if what == "base_large" else "small")
        with open(os.path.join(tmp, "version"), "w") as f:
            f.write(version(what))
        if stale:
            print(f"rebuilt {path}: it was built by other code than the current common/toy.py")
            shutil.rmtree(path)
        os.replace(tmp, path)  # atomic: a half-built default is never seen


def _recorded_version(path):
    try:
        with open(os.path.join(path, "version")) as f:
            return f.read()
    except OSError:
        return None


def data(name):
    return os.path.join(ensure("data"), name)


@torch.no_grad()
def evaluate(model, tok, records, max_new_tokens=None, batch_size=256):
    """Greedy exact-match accuracy on [{"prompt", "answer"}], split across processes. max_new_tokens, by default 16
    a step of the longest of the task's questions (a step: one operation; 16 for any other prompt), leaves room for
    the longest completion of the task, "99+99=198" and EOS (10 tokens), and for a multi-step one (a line a step)."""
    from common.dist import gathered
    from common.template import encode_prompt

    steps = [re.fullmatch(r"What is ([\d+-]+)\?", r["prompt"]) for r in records]  # the task's questions; else 1
    max_new_tokens = max_new_tokens or 16 * max(len(re.findall(r"[+-]", m[1])) if m else 1 for m in steps)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    per = -(-len(records) // world)
    mine = records[rank * per:(rank + 1) * per]
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    correct = torch.zeros(2, device=device)
    for i in range(0, per, batch_size):  # same number of generate calls on every rank (FSDP all-gathers)
        chunk = mine[i:i + batch_size] or records[:1]
        ids = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in chunk]
        width = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in ids], device=device)
        lengths = torch.tensor([len(s) for s in ids], device=device)
        # left padding: the real tokens of a row start at width - len(row)
        mask = (torch.arange(width, device=device) >= (width - lengths)[:, None]).long()
        with gathered(model):  # under FSDP2: the weights gathered once for all tokens, not at every token
            out = model.generate(input_ids=x, attention_mask=mask,
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, synced_gpus=dist)
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        real = mine[i:i + batch_size]
        correct[0] += sum(verify(t, r["answer"]) for t, r in zip(texts, real))
        correct[1] += len(real)
    if dist:
        torch.distributed.all_reduce(correct)
    model.train(was_training)
    return (correct[0] / correct[1].clamp(min=1)).item()
