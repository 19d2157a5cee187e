"""./run.sh gpu: the GPU path end to end, in about 11 minutes on one H200 (see --parts to split it).

1. The reference tests that need no training (losses, templates, packing, the device habits) under this machine's
   torch and transformers, including the packed-versus-per-document logits of every attention path present
   (sdpa; PyTorch's varlen FlashAttention; flash-attn when installed).
2. Every algorithm on the embedded default for a few steps on CUDA (bf16 autocast): ok, or failed with its error.
3. Throughput on a Qwen2-0.5B-shaped model (random init, vocab 151936, built here in seconds) on long-tailed synthetic
   chats: SFT packed (chunked log-probs, full logits, gradient checkpointing) and padded (real tokens/s, peak memory,
   MFU against 989 TFLOP/s dense bf16), DPO pairs/s, and GRPO seconds per step for 64 completions of 256 new tokens;
   the same SFT, DPO and GRPO with LoRA adapters of rank 16, whose peak memory reads against the full rows.
4. With `--trl DIR`: Hugging Face TRL on the same model, data, batch and settings, timed here (trl_sft, trl_dpo,
   trl_grpo; TRL installed from DIR/wheels when missing), and the ratio of ours to it.
5. With `--profile`: where the time of a GRPO decode, a packed SFT step and a DPO step goes (torch.profiler).
`--small`: the same steps on a tiny model and short runs, to check the plumbing on a machine without a GPU.
`--deadline S`: a run or part that would end after S seconds is skipped and listed as skipped, so one call fits a
lent machine's time. `--parts smoke,headline,trl,rest,profile` (the default, without profile unless `--profile`)
names the parts to run, in the order given: the reference tests with the smoke runs (1, 2), the four headline
throughput rows, TRL's side (4), the other rows, the profiles (5).
Logs go to $GPU_OUT (default /tmp/gpu_check); each table is printed as it is measured.
"""
import glob
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.environ.get("GPU_OUT", "/tmp/gpu_check")
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 tie_word_embeddings=True, rope_theta=1e6)
FAST_TESTS = ["tests/test_losses.py", "tests/test_template.py", "tests/test_packing.py", "tests/test_device.py",
              "tests/test_chunked.py", "-k", "not agree_with_and_without and not uses_less_memory and not under_fsdp"]


def script(name, *args, tag=None, timeout=300):
    """python algos/<name>.py args -> (ok, seconds, last error line); its output in OUT/<tag>.log."""
    tag = tag or name
    t = time.time()
    with open(os.path.join(OUT, f"{tag}.log"), "w") as log:
        try:
            p = subprocess.run([sys.executable, f"algos/{name}.py", *map(str, args)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            ok = p.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    with open(os.path.join(OUT, f"{tag}.log")) as log:
        lines = [ln.strip() for ln in log if ln.strip()]
    error = "" if ok else next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "timeout")
    return ok, time.time() - t, error[:150]


def smoke():
    """Each algorithm for a few steps on the embedded default; stages run their scripts side by side."""
    run_dir = lambda name: os.path.join(OUT, "runs", name)  # noqa: E731
    few = ["--max_steps", 3, "--log_every", 1, "--eval_every", 0, "--save_every", 2]
    stages = [
        {"sft": ("sft", "--max_steps", 20, "--log_every", 5, "--eval_every", 0, "--save_every", 10)},
        {**{a: (a, "--model", run_dir("sft"), *few) for a in
            ("rm", "dpo", "ipo", "kto", "orpo", "simpo", "grpo", "rloo", "remax", "online_dpo")},
         "rft": ("rft", "--model", run_dir("sft"), "--rounds", 2, "--prompts_per_round", 64, "--save_every", 1),
         "ppo_verifier": ("ppo", "--model", run_dir("sft"), "--reward", "verifier", *few),
         **{f"distill_{m}": ("distill", "--mode", m, "--teacher", run_dir("sft"), "--model", run_dir("sft"), *few)
            for m in ("seqkd", "forward_kl", "reverse_kl", "on_policy")}},
        {"ppo": ("ppo", "--model", run_dir("sft"), "--reward_model", run_dir("rm"), *few),
         "grpo_lora": ("grpo", "--model", run_dir("sft"), "--lora_r", 8, "--beta", 0.04, "--merge_lora", "true", *few),
         "dpo_lora": ("dpo", "--model", run_dir("sft"), "--lora_r", 8, *few),
         "merge": ("merge", "--method", "ties", "--base", run_dir("sft"), "--models", run_dir("grpo"),
                   run_dir("dpo")),
         "prm": ("prm", "--model", run_dir("sft"), "--num_prompts", 64, "--rollouts", 2, *few)},
        {"best_of_n": ("best_of_n", "--policy", run_dir("sft"), "--prm", run_dir("prm"), "--orm", run_dir("rm"),
                       "--n", "1,2")},
    ]
    results = {}
    for stage in stages:
        with ThreadPoolExecutor(len(stage)) as pool:
            futures = {tag: pool.submit(script, cmd[0], *cmd[1:], "--output_dir", run_dir(tag), tag=tag)
                       for tag, cmd in stage.items()}
            results.update({tag: f.result() for tag, f in futures.items()})
    return results


SMALL = "--small" in sys.argv  # the same steps on a tiny model and short runs: the plumbing, on any machine
SHAPE = (dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True) if SMALL else QWEN2_05B)
# Each throughput run: (name, script, its settings, optimizer steps, steps between logs, units per step)
SFT_ROWS, SFT_LEN, N_STEPS = (2, 512, 6) if SMALL else (4, 4096, 12)
PACKED = ["--max_len", SFT_LEN, "--batch_size", SFT_ROWS]
GRPO = ["--batch_size", 2 if SMALL else 8, "--group_size", 8, "--max_new_tokens", 32 if SMALL else 256,
        "--max_len", 512]
DPO = ["--max_len", 256 if SMALL else 1024, "--batch_size", 8]
GRPO_ROWS = f"{2 if SMALL else 8} prompts x 8 completions"
RUNS = [  # (name, script, its arguments, the settings as the table shows them), the headline runs first
    ("sft packed", "sft", PACKED, f"rows of {SFT_ROWS} x {SFT_LEN}, compiled (the default on CUDA)"),
    ("sft packed, eager", "sft", [*PACKED, "--compile", "false"], f"rows of {SFT_ROWS} x {SFT_LEN}, --compile false"),
    ("dpo", "dpo", DPO, "8 pairs a step, packed, compiled"),
    ("grpo", "grpo", GRPO, f"{GRPO_ROWS}, --share_prompt auto"),
    ("sft packed, full logits", "sft", [*PACKED, "--loss_chunk", 0], f"rows of {SFT_ROWS} x {SFT_LEN}, --loss_chunk 0"),
    ("ppo", "ppo", [*GRPO, "--reward", "verifier", "--num_minibatches", 4, "--ppo_epochs", 1],
     f"{GRPO_ROWS}, verifier reward, 4 minibatches, 1 epoch"),
    ("grpo, dynamic cache", "grpo", [*GRPO, "--static_cache", "false"], f"{GRPO_ROWS}, --static_cache false"),
    ("grpo, shared prompt", "grpo", [*GRPO, "--share_prompt", "true"], f"{GRPO_ROWS}, --share_prompt true"),
    ("sft packed, grad. ckpt", "sft", [*PACKED, "--gradient_checkpointing", "true"],
     f"rows of {SFT_ROWS} x {SFT_LEN}, --gradient_checkpointing"),
    ("sft padded", "sft", ["--max_len", SFT_LEN, "--batch_size", 2 * SFT_ROWS, "--packing", "false"],
     f"{2 * SFT_ROWS} chats a batch, max_len {SFT_LEN}"),
    ("dpo, eager", "dpo", [*DPO, "--compile", "false"], "8 pairs a step, packed, --compile false"),
    ("dpo padded", "dpo", [*DPO, "--packing", "false"], "8 pairs a step, --packing false"),
    # LoRA against the full rows above: peak memory (weights frozen: no gradients or Adam moments for them)
    ("sft packed, LoRA", "sft", [*PACKED, "--lora_r", 16], f"rows of {SFT_ROWS} x {SFT_LEN}, --lora_r 16"),
    ("dpo, LoRA", "dpo", [*DPO, "--lora_r", 16], "8 pairs a step, packed, compiled, --lora_r 16"),
    ("grpo, LoRA", "grpo", [*GRPO, "--lora_r", 16, "--beta", 0.04],
     f"{GRPO_ROWS}, --lora_r 16, --beta 0.04 (reference: adapters off)"),
]
N_HEADLINE = 4  # TRL's side runs after these, before the rest
T0 = time.time()
DEADLINE = T0 + float(sys.argv[sys.argv.index("--deadline") + 1]) if "--deadline" in sys.argv else float("inf")


def too_late(seconds):
    """True when a part of about `seconds` would end after --deadline; the caller skips it and says so."""
    return time.time() + seconds > DEADLINE


def make_big(d):
    """A Qwen2-0.5B-shaped model (random init; the embedded character tokenizer) and long-tailed data files."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common import toy
    os.makedirs(d, exist_ok=True)
    tok = toy.build_tokenizer(f"{d}/q05")
    cfg = Qwen2Config(**SHAPE, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(f"{d}/q05")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     .,"
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
    turn = lambda mu, sigma, cap: text(min(cap, int(rng.lognormvariate(mu, sigma))))  # noqa: E731
    chats, pairs, prompts = [], [], []
    # 1,000 chats (about 250 packed rows of 4096, where a run takes 48) and 256 pairs, since both DPO sides compute
    # every pair's reference log-probabilities before training: more data would only lengthen the check
    for _ in range(300 if SMALL else 1000):  # turns geometric, lengths lognormal: median ~300 characters a reply
        msgs = []
        for _ in range(min(6, 1 + int(rng.expovariate(0.8)))):
            msgs += [{"role": "user", "content": turn(4.3, 0.8, 2000)},
                     {"role": "assistant", "content": turn(5.7, 0.9, 3000)}]
        chats.append({"messages": msgs})
        pairs.append({"prompt": msgs[0]["content"][:400], "chosen": turn(5.7, 0.9, 600),
                      "rejected": turn(5.7, 0.9, 600)})
        prompts.append({"prompt": text(rng.randint(20, 80)), "answer": "0"})
    for name, rows in (("chats", chats), ("pairs", pairs[:256]), ("pairs_eval", pairs[:64]), ("prompts", prompts)):
        with open(f"{d}/{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return n_params


def rates(out, per_step=1, skip=1):
    """From metrics.jsonl: mean tokens/s, units/s (per_step units per optimizer step) and s/step over the log
    intervals after the first `skip` (warm-up), and the peak memory."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    timed = list(zip(rows[skip - 1:], rows[skip:]))
    steps = sum(b["step"] - a["step"] for a, b in timed)
    seconds = sum(b["time"] - a["time"] for a, b in timed)
    sampling = {"generate_s": sum(b["generate_s"] for _, b in timed) / len(timed)} if "generate_s" in rows[-1] else {}
    if "mismatch_k3" in rows[-1]:  # grpo: the sampler (bf16 copy, fixed-size cache) against the training forward
        sampling["mismatch_k3"] = sum(r["mismatch_k3"] for r in rows) / len(rows)
    return {"tokens_per_s": sum(b["tokens_per_s"] for _, b in timed) / len(timed), "per_s": steps * per_step / seconds,
            "s_per_step": seconds / steps, "peak_mem_gb": rows[-1]["peak_mem_gb"], **sampling}


def show(r, name):
    """The throughput cell of a run: tokens/s for SFT, pairs/s for DPO, s/step for GRPO."""
    if name.startswith("sft"):
        return f"{r['tokens_per_s']:,.0f} real tokens/s"
    if name.startswith("dpo"):
        return f"{r['per_s']:.1f} pairs/s"
    return f"{r['s_per_step']:.2f} s/step ({r['generate_s']:.2f} s sampling)"


def throughput(d, runs, n_params, header=True):
    """Each run in turn (the GPU to itself); its table row printed as soon as it is measured."""
    print(f"\n{'Tiny' if SMALL else 'Qwen2-0.5B'} shape ({n_params / 1e6:.0f}M params, vocab {SHAPE['vocab_size']}, "
          "random init), bf16 autocast, fp32 weights:\n" if header else "", flush=True)
    print("| run | settings | throughput | peak GB | MFU (6N) |\n|---|---|---|---|---|", flush=True)
    q05, rows = f"{d}/q05", {}
    common = ["--model", q05, "--save_every", 0, "--eval_every", 0]
    for name, algo, settings, described in runs:
        if too_late(60):
            print(f"| {name} | {described} | skipped (--deadline) | | |", flush=True)
            continue
        if algo == "sft":
            every = N_STEPS // 2  # the first half untimed: compiling (the default on CUDA) and warming up
            extra = ["--data", f"{d}/chats.jsonl", "--max_steps", N_STEPS, "--log_every", every]
        elif algo == "dpo":
            # steps 9-16 timed (eight of about 0.2 s; six gave 40-57 pairs/s between calls): the first eight compile
            # and warm up; no eval inside the timing
            extra = ["--data", f"{d}/pairs.jsonl", "--max_steps", 16, "--log_every", 4]
        else:
            # the first step compiles the decode step, the second's update still ran 4 s slower than the rest on an
            # H200: steps 3-5 are timed
            extra = ["--data", f"{d}/prompts.jsonl", "--max_steps", 5, "--log_every", 1]
        tag = "tp_" + name.replace(" ", "_").replace(",", "").replace(".", "")
        out = os.path.join(OUT, "runs", tag)
        ok, seconds, error = script(algo, *settings, *extra, *common, "--output_dir", out, tag=tag, timeout=240)
        per_step = {"dpo": 8, "grpo": 8 * (2 if SMALL else 8)}.get(algo, 1)
        r = rows[name] = rates(out, per_step=per_step, skip=1 if algo == "sft" else 2) if ok else {"error": error}
        r["wall_s"] = seconds
        if "error" in r:
            print(f"| {name} | {described} | FAILED: {r['error']} | | |", flush=True)
            continue
        if algo == "sft":
            r["mfu"] = 6 * n_params * r["tokens_per_s"] / PEAK_FLOPS
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"| {name} | {described} | {show(r, name)} | {r['peak_mem_gb']:.1f} | {mfu} |", flush=True)
        if "mismatch_k3" in r:
            print(f"| {name}: sampler mismatch | k3 of KL(π_sampler ‖ π_train) a completion token | "
                  f"{r['mismatch_k3']:.2e} | | |", flush=True)
    return rows


UNIT = ("step", "token")
KINDS = (("attention", ("flash", "fmha", "attn")), ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
         ("compiled (Triton)", ("triton",)), ("elementwise and reductions", ("elementwise", "reduce", "vectorized")),
         ("other", ("",)))  # a kernel counts in the first kind whose marks its name holds


def profiled(fn, n, units, what, warm=1):
    """fn() timed n times (after `warm` untimed calls) and once under torch.profiler: wall and GPU-busy seconds per
    unit, kernels launched per unit, GPU time by kind of kernel and the costliest kernels. GPU busy far below wall:
    the host (Python, launches, synchronisations) bounds the work, not the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    for _ in range(warm):
        fn()
    sync()
    t = time.time()
    for _ in range(n):
        fn()
    sync()
    wall = (time.time() - t) / (n * units)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])) as prof:
        fn()
        sync()
    # kernels on a GPU, operators' own time on a CPU; user annotations ("Optimizer.step#AdamW.step") left out, since
    # their time is their kernels', counted already
    on_gpu = DEVICE == "cuda"
    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == on_gpu and "#" not in e.key]
    cost = {e.key: (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / units / 1e6 for e in events}
    busy, launches = sum(cost.values()), sum(e.count for e in events) / units
    print(f"\n{what}: {1e3 * wall:.2f} ms wall per {UNIT[units > 1]}, {1e3 * busy:.2f} ms of it "
          f"{'GPU busy' if on_gpu else 'CPU op time'}, {launches:.0f} {'kernels' if on_gpu else 'ops'} per "
          f"{UNIT[units > 1]}\n\n| kernel | ms | share |\n|---|---|---|", flush=True)
    kind_of = {k: next(kind for kind, marks in KINDS if any(m in k.lower() for m in marks)) for k in cost}
    kinds = {kind: sum(c for k, c in cost.items() if kind_of[k] == kind) for kind, _ in KINDS}
    for key, c in [*kinds.items(), *sorted(cost.items(), key=lambda kc: -kc[1])[:12]]:
        print(f"| {key[:90]} | {1e3 * c:.2f} | {100 * c / max(busy, 1e-12):.0f}% |", flush=True)
    return {"wall_s": wall, "busy_s": busy, "launches": launches, "kinds": kinds}


def profiles(d, parts=("decode", "sft", "dpo"), decode_attn=("sdpa",)):
    """--profile: where a GRPO decode's, a packed SFT step's and a DPO step's time goes on the 0.5B shape (the steps
    eager and compiled); the decode with each
    attention implementation of decode_attn ("eager": transformers' matrix-product attention, where sdpa's kernels
    are built for many queries and a decode step has one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from algos import dpo, sft
    from common import dist, packing
    from common.logps import label_logps, sequence_logps
    from common.sampling import bf16_sampler, generate
    from common.template import encode_prompt
    device, q05, found = torch.device(DEVICE), f"{d}/q05", {}
    tok = AutoTokenizer.from_pretrained(q05)
    model = AutoModelForCausalLM.from_pretrained(q05, dtype=torch.float32, attn_implementation=dist.attn_impl(device))
    model.to(device)
    if "decode" in parts:  # as grpo.py samples on one GPU: a bf16 copy of the policy, the fixed-size cache
        n_new, G = GRPO[GRPO.index("--max_new_tokens") + 1], 8
        cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n_new,
                               min_new_tokens=n_new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}])
                   for r in map(json.loads, open(f"{d}/prompts.jsonl").readlines()[:GRPO[1]])]
        for attn in decode_attn:
            sampler = bf16_sampler(model)
            sampler.set_attn_implementation(attn)
            decode = lambda: generate(sampler, prompts, G, tok, cfg, device, static_len=512)  # noqa: E731
            found[f"decode_{attn}"] = profiled(decode, 1, n_new, f"GRPO sampling, {len(prompts)} prompts x {G} x "
                                               f"{n_new} new tokens, bf16 copy and fixed-size cache, {attn} attention")
            del sampler
    steps, step_no = {}, iter(range(10 ** 6))
    if "sft" in parts:
        args = sft.parse_args(["--model", q05, "--data", f"{d}/chats.jsonl", *map(str, PACKED)])
        rows = packing.pack(sft.load_docs(args.data, tok, args)[0], SFT_LEN, tok.pad_token_id)

        def sft_step():  # sft.py's step, without its logging
            idx = torch.arange(SFT_ROWS) + SFT_ROWS * (next(step_no) % (len(rows["input_ids"]) // SFT_ROWS))
            fwd = {k: dist.to_device(rows[k][idx], device) for k in ("input_ids", "position_ids")}
            fwd.update(packing.boundaries(rows["position_ids"][idx], device))
            with dist.autocast(device):
                logps = label_logps(model, fwd, rows["labels"][idx], dist.logits_budget(-1, device))
            return -logps.sum() / len(logps)

        steps[f"SFT packed step, rows of {SFT_ROWS} x {SFT_LEN}"] = ("sft", sft_step)
    if "dpo" in parts:
        args = dpo.parse_args(["--max_len", str(DPO[1])])
        pairs = dpo.load_pairs(f"{d}/pairs.jsonl", tok, args)[0]
        packed, zeros = dist.attn_impl(device) != "sdpa", torch.zeros(8, device=device)

        def dpo_step():  # dpo.py's step on 8 pairs, without its logging; zeros stand in for the reference log-probs
            batch = [pairs[(8 * next(step_no) + j) % len(pairs)] for j in range(8)]
            seqs = [c for c, _ in batch] + [r for _, r in batch]
            logps, _ = sequence_logps(model, seqs, tok.pad_token_id, packed, dist.logits_budget(-1, device), device)
            logps_c, logps_r = logps.chunk(2)
            return dpo.dpo_loss(logps_c, logps_r, zeros, zeros, 0.1, 8)[0]

        steps["DPO packed step, 8 pairs"] = ("dpo", dpo_step)
    if steps:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")  # as the scripts' on CUDA

        def train(loss_fn):
            loss_fn().backward()
            dist.clip_grads(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for mode in ("eager", "compiled"):  # compiled: the default on CUDA
            if mode == "compiled":
                dist.compile_layers(model)
            for what, (tag, loss_fn) in steps.items():
                found[f"{tag}_{mode}"] = profiled(lambda: train(loss_fn), 3, 1, f"{what}, {mode}",
                                                  warm=1 if mode == "eager" else 3)
    return found


def step_clock(ends):
    """A TrainerCallback that appends to `ends` the wall time at the end of every optimizer step, the GPU's work
    included (TRL's side of the timing)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ends.append(time.time())

    return Clock()


def trl_sft(model, chats, max_len, rows, steps):
    """TRL's SFTTrainer on our SFT row's model and chats: packing into rows of max_len, gradient checkpointing off
    as ours, bf16; timed from its first logging interval (every 5 steps) to its last, by the tokens it reports.
    Run in a process of its own (trl_side) -> one JSON line."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    marks = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                marks.append((time.time(), logs["num_tokens"]))

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = SFTConfig(output_dir=os.path.join(OUT, "trl_sft"), per_device_train_batch_size=int(rows),
                    max_length=int(max_len), packing=True, max_steps=int(steps), logging_steps=5, learning_rate=1e-4,
                    lr_scheduler_type="cosine", warmup_steps=1, bf16=DEVICE == "cuda", use_cpu=DEVICE != "cuda",
                    gradient_checkpointing=False, save_strategy="no", report_to="none", dataloader_num_workers=0)
    SFTTrainer(model=m, args=cfg, train_dataset=load_dataset("json", data_files=chats, split="train"),
               processing_class=AutoTokenizer.from_pretrained(model), callbacks=[Clock()]).train()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    print(json.dumps({"tokens_per_s": (n1 - n0) / (t1 - t0),
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}))


def trl_dpo(model, pairs, max_len, batch, steps):
    """TRL's DPOTrainer on our DPO row's model, pairs (as chat messages, through the same template), batch and beta,
    its reference log-probabilities computed before training as ours are, gradient checkpointing off as ours;
    steps 9-16 timed, as ours. Run in a process of its own (trl_side) -> one JSON line."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    ends = []  # wall time at the end of every step

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in map(json.loads, open(pairs))]
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = DPOConfig(output_dir=os.path.join(OUT, "trl_dpo"), per_device_train_batch_size=int(batch),
                    max_length=int(max_len), max_steps=int(steps), beta=0.1, learning_rate=5e-5,
                    bf16=DEVICE == "cuda", use_cpu=DEVICE != "cuda",
                    precompute_ref_log_probs=True, gradient_checkpointing=False, logging_steps=4,
                    save_strategy="no", report_to="none", dataloader_num_workers=0)
    DPOTrainer(model=m, args=cfg, train_dataset=Dataset.from_list(rows),
               processing_class=AutoTokenizer.from_pretrained(model), callbacks=[step_clock(ends)]).train()
    timed = ends[len(ends) // 2 - 1:]  # from the end of step 8 to the end of step 16
    print(json.dumps({"trl_dpo_pairs_per_s": int(batch) * (len(timed) - 1) / (timed[-1] - timed[0]),
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}))


def trl_grpo(model, prompts, new_tokens, steps, n_prompts):
    """TRL's GRPOTrainer (its HF generate, no vLLM) on our GRPO row's model, prompts and shape: n_prompts x 8
    completions of new_tokens a step, beta 0.04, gradient checkpointing off as ours; steps 3-5 timed, as ours.
    Run in a process of its own (trl_side) -> one JSON line."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    ends = []  # wall time at the end of every step

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in map(json.loads, open(prompts))]

    def exact(completions, answer, **kw):  # the verifier's kind of reward; its value does not change the work
        return [float(c[0]["content"].strip().endswith(a)) for c, a in zip(completions, answer)]

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    cfg = GRPOConfig(output_dir=os.path.join(OUT, "trl_grpo"), per_device_train_batch_size=8 * int(n_prompts),
                     num_generations=8, max_completion_length=int(new_tokens), max_steps=int(steps), beta=0.04,
                     learning_rate=1e-6, bf16=DEVICE == "cuda", use_cpu=DEVICE != "cuda", gradient_checkpointing=False,
                     logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0)
    GRPOTrainer(model=m, reward_funcs=exact, args=cfg, train_dataset=Dataset.from_list(rows),
                processing_class=AutoTokenizer.from_pretrained(model), callbacks=[step_clock(ends)]).train()
    print(json.dumps({"trl_grpo_s_per_step": (ends[-1] - ends[1]) / (len(ends) - 2),  # steps 3..5 of 5
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}))


def trl_side(d, helper, ours, names=("sft packed", "dpo", "grpo")):
    """Hugging Face TRL on the same model, data and batch, timed by trl_sft, trl_dpo and trl_grpo (gradient
    checkpointing off, as ours), each in a process of its own, with TRL installed from helper/wheels when missing;
    a row per run (of names) beside ours, with the ratio."""
    env = dict(os.environ)
    if importlib.util.find_spec("trl") is None and os.path.isdir(os.path.join(helper, "wheels")):
        site = os.path.join(OUT, "trl_site")
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                            *glob.glob(os.path.join(helper, "wheels", "*.whl"))])
        if p.returncode:
            print(f"\nTRL: its wheels in {helper}/wheels did not install here; no comparison", flush=True)
            return {}
        env["PYTHONPATH"] = site
    q05 = f"{d}/q05"
    runs = [("sft packed", ["--trl_sft", q05, f"{d}/chats.jsonl", SFT_LEN, SFT_ROWS, 15], "tokens_per_s"),
            ("dpo", ["--trl_dpo", q05, f"{d}/pairs.jsonl", 256 if SMALL else 1024, 8, 16], "trl_dpo_pairs_per_s"),
            ("grpo", ["--trl_grpo", q05, f"{d}/prompts.jsonl", GRPO[GRPO.index("--max_new_tokens") + 1], 5, GRPO[1]],
             "trl_grpo_s_per_step")]
    print("\nHugging Face TRL on the same model, data and batch (gradient checkpointing off, as ours):\n\n"
          "| run | TRL | peak GB | ours / TRL |\n|---|---|---|---|", flush=True)
    results = {}
    for name, args, key in [r for r in runs if r[0] in names]:
        if too_late(90):
            print(f"| {name} | skipped (--deadline) | | |", flush=True)
            continue
        log_name = f"{args[0].lstrip('-')}.log"
        with open(os.path.join(OUT, log_name), "w") as log:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True, timeout=300)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            print(f"| {name} | FAILED ({log_name}) | | |", flush=True)
            continue
        r = results[name] = json.loads(lines[-1])
        mine = ours.get(name, {})
        if name == "grpo":
            value, ratio = f"{r[key]:.2f} s/step", r[key] / mine["s_per_step"] if "s_per_step" in mine else None
        else:
            unit = "real tokens/s" if name.startswith("sft") else "pairs/s"
            mine_value = mine.get("tokens_per_s" if name.startswith("sft") else "per_s")
            value, ratio = f"{r[key]:,.1f} {unit}", mine_value / r[key] if mine_value else None
        print(f"| {name} | {value} | {r['peak_mem_gb']:.1f} | {f'{ratio:.2f}x' if ratio else ''} |", flush=True)
    return results


def main():
    os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
    import transformers

    from common import dist
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "no GPU (CPU)"
    env = (f"{name} | torch {torch.__version__} | transformers {transformers.__version__} | "
           f"training attention: {dist.attn_impl(torch.device(DEVICE))}")
    print(f"## ./run.sh gpu: {env}", flush=True)
    helper = sys.argv[sys.argv.index("--trl") + 1] if "--trl" in sys.argv else ""
    parts = (sys.argv[sys.argv.index("--parts") + 1].split(",") if "--parts" in sys.argv else
             ["smoke", "headline", "trl", "rest"] + ["profile"] * ("--profile" in sys.argv))
    unknown = set(parts) - {"smoke", "headline", "trl", "rest", "profile"}
    if unknown:
        sys.exit(f"error: --parts takes smoke, headline, trl, rest, profile; got {', '.join(sorted(unknown))}")
    found, failed = {"env": env}, False
    big = os.path.join(OUT, "big")

    def save(**part):  # gpu.json after every part, so a call cut short keeps what it measured
        found.update(part)
        with open(os.path.join(OUT, "gpu.json"), "w") as f:
            json.dump(found, f, indent=1)

    for part in parts:  # in the order given
        if part != "smoke" and "n_params" not in found:
            save(n_params=make_big(big))
        if part == "smoke":  # the reference tests in the background, beside the smoke runs (both leave the GPU idle)
            with open(os.path.join(OUT, "tests.log"), "w") as log:
                tests = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                smoke_results = smoke()
                tests.wait()
            with open(os.path.join(OUT, "tests.log")) as log:
                tests_line = [ln.strip() for ln in log if ln.strip()][-1]
            print(f"\nreference tests (incl. packed = per-document logits per attention path): {tests_line}")
            print("\n| algorithm | on CUDA | seconds | error |\n|---|---|---|---|")
            for tag, (ok, seconds, error) in smoke_results.items():
                print(f"| {tag} | {'ok' if ok else 'FAILED'} | {seconds:.0f} | {error} |")
            failed |= " failed" in tests_line or not all(ok for ok, _, _ in smoke_results.values())
            save(tests=tests_line, smoke=smoke_results)
        elif part in ("headline", "rest"):
            runs = RUNS[:N_HEADLINE] if part == "headline" else RUNS[N_HEADLINE:]
            tp = throughput(big, runs, found["n_params"], header="throughput" not in found)
            failed |= any("error" in r for r in tp.values())
            save(throughput={**found.get("throughput", {}), **tp})
        elif part == "trl" and helper:
            save(trl=trl_side(big, os.path.abspath(helper), found.get("throughput", {})))
        elif part == "profile":
            if too_late(150):
                print("\nprofiles: skipped (--deadline)", flush=True)
            else:
                save(profile=profiles(big))
        print(f"({time.time() - T0:.0f} s)", flush=True)
    print(f"\ntotal {time.time() - T0:.0f} s")
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl_sft"]:
        trl_sft(*sys.argv[2:7])
    elif sys.argv[1:2] == ["--trl_dpo"]:
        trl_dpo(*sys.argv[2:7])
    elif sys.argv[1:2] == ["--trl_grpo"]:
        trl_grpo(*sys.argv[2:7])
    else:
        main()
