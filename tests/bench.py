"""Throughput and memory benchmarks (./run.sh bench); nothing here is asserted, only measured.

SFT: real (non-pad) tokens/s packed and padded, peak memory, MFU (6 x params x tokens/s over a
matmul peak measured here), on a 3.2M-parameter Llama (the embedded 'large' size) and a
long-tailed mix of conversation lengths; the same model, data and batch through Hugging Face TRL's
SFTTrainer when a TRL environment is available (.venv-trl, made by ./run.sh bench).
"""
import json
import os
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "bench")
TRL_PY = os.path.join(ROOT, ".venv-trl", "bin", "python")
MAX_LEN, BATCH, STEPS, WARMUP = 1024, 8, 40, 10


def make_inputs():
    """A random-init 'large' toy Llama and 3000 chats whose turn count is geometric (1 to 16 turns)."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import toy
    os.makedirs(OUT, exist_ok=True)
    model_dir, data = os.path.join(OUT, "model"), os.path.join(OUT, "chats.jsonl")
    if not os.path.exists(model_dir):
        torch.manual_seed(0)
        tok = toy.build_tokenizer(model_dir)
        cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                          bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          **toy.SIZES["large"])
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(3000):
            msgs = []
            for _ in range(min(16, 1 + int(rng.expovariate(0.5)))):
                q, a = toy.problem(rng)
                msgs += [{"role": "user", "content": f"What is {q}?"}, {"role": "assistant", "content": f"{q}={a}"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return model_dir, data


def matmul_peak():
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t, n = time.time(), 0
    while time.time() - t < 2:
        a @ b
        n += 1
    return 2 * 2048 ** 3 * n / (time.time() - t)


def ours(model_dir, data, packing):
    out = os.path.join(OUT, f"ours_{'packed' if packing else 'padded'}")
    eval_data = os.path.join(OUT, "eval_tiny.jsonl")
    with open(eval_data, "w") as f:
        f.write(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n")
    subprocess.run([sys.executable, "algos/sft.py", "--model", model_dir, "--data", data, "--eval_data", eval_data,
                    "--output_dir", out, "--max_len", str(MAX_LEN), "--batch_size", str(BATCH),
                    "--packing", str(packing), "--max_steps", str(STEPS), "--log_every", str(WARMUP),
                    "--eval_every", "0", "--save_every", "0", "--lr", "1e-3"],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "tokens_per_s" in line]
    return sum(r["tokens_per_s"] for r in rows[1:]) / len(rows[1:]), rows[-1]["peak_mem_gb"]


def trl(model_dir, data, packing):
    """Runs in the TRL environment: SFTTrainer, same model, data, rows per step, max length, lr."""
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                marks.append((time.time(), logs["num_tokens"]))

    cfg = SFTConfig(output_dir=os.path.join(OUT, "trl"), per_device_train_batch_size=BATCH, max_length=MAX_LEN,
                    packing=packing, max_steps=STEPS, logging_steps=WARMUP, save_strategy="no", report_to="none",
                    learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, use_cpu=True,
                    dataloader_num_workers=0)
    train = load_dataset("json", data_files=data, split="train")
    trainer = SFTTrainer(model=model_dir, args=cfg, train_dataset=train, callbacks=[Clock()])
    trainer.train()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    print(json.dumps({"tokens_per_s": (n1 - n0) / (t1 - t0),
                      "peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def trl_side(script, *args):
    """Runs `script --trl args` in the TRL environment: (the JSON it printed last, None) if it succeeded, else
    (None, the last line of its stderr)."""
    p = subprocess.run([TRL_PY, script, "--trl", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if p.returncode == 0:
        return json.loads(p.stdout.strip().splitlines()[-1]), None
    return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit status {p.returncode}"


def main():
    model_dir, data = make_inputs()
    import torch
    from transformers import AutoModelForCausalLM
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    peak = matmul_peak()
    print(f"SFT benchmark: {params / 1e6:.2f}M-param Llama, {BATCH} rows x max_len {MAX_LEN}, {STEPS} steps "
          f"(first {WARMUP} not timed), {torch.get_num_threads()} threads, matmul peak {peak / 1e9:.1f} GFLOP/s")
    results = {}
    for packing in (True, False):
        name = "packed" if packing else "padded"
        tps, mem = ours(model_dir, data, packing)
        results[name] = tps
        line = f"  ours {name:6s}: {tps:8.0f} real tokens/s  peak {mem:.2f} GB  MFU {6 * params * tps / peak:.1%}"
        if os.path.exists(TRL_PY):
            r, err = trl_side(__file__, model_dir, data, packing)
            line += (f" | TRL failed: {err}" if err else f" | TRL {r['tokens_per_s']:8.0f} tokens/s  peak "
                     f"{r['peak_mem_gb']:.2f} GB | ours/TRL {tps / r['tokens_per_s']:.2f}x")
        print(line, flush=True)
    print(f"  packing / padding: {results['packed'] / results['padded']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl"]:
        trl(sys.argv[2], sys.argv[3], sys.argv[4] == "True")
    else:
        main()
