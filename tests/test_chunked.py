"""Chunked log-probabilities (ChunkedLogps): the same values and gradients as the model's full logits, less memory.

`python tests/test_chunked.py CHUNK` prints the peak memory of one forward and backward of the summed label
log-probabilities on the embedded 'large' shape (random weights: memory does not depend on them) with a 32768-token
output embedding (the size of a real tokenizer's; the embedded one has 100 tokens, whose logits cost nothing).
"""
import json
import subprocess
import sys

import pytest
import torch
from util import ROOT, metrics, run

from common import logps as lp


def batch(model):
    """Two packed-style rows (position_ids restart) and a padded row, with unlabelled prompts and padding."""
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 48))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 30:] = -100
    positions = torch.cat([torch.arange(20), torch.arange(28)]).repeat(3, 1)
    return {"input_ids": ids, "position_ids": positions}, labels


def logps_and_grads(model, chunk, autocast):
    fwd, labels = batch(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps = lp.label_logps(model, fwd, labels, chunk * model.config.vocab_size)  # chunk positions a chunk
    # distinct weights per position, so a gradient routed to the wrong position or row would show
    (logps * torch.linspace(-1.0, 2.0, len(logps))).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_equals_full_logits(model, chunk):
    full, full_grads = logps_and_grads(model, 0, autocast=False)
    logps, grads = logps_and_grads(model, chunk, autocast=False)
    labels = batch(model)[1]
    assert logps.shape == ((labels[:, 1:] != -100).sum(),)
    assert torch.allclose(logps, full, atol=1e-5)
    for name, g in full_grads.items():
        assert g.abs().max() > 0, name  # every parameter takes part, the output embedding (tied) included
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_chunked_under_autocast_matches_within_bf16(model):
    """Under bf16 autocast the products run in bf16 in both paths, so neither gives the exact gradient: bf16 keeps 8
    bits, and some gradients (layer 0's q_proj here) are small sums of large terms, off by tens of percent in either
    path. The bound is therefore the full-logit path's own rounding error, measured here against fp32 on the same
    CPU kernels: the chunked path's error is at most 1.5 times it (any kernel path, any base model's weights), plus
    0.1% of the gradient for parameters the rounding barely touches. A fixed share of the gradient's largest entry
    held on one kernel path and failed on another, whose bf16 rounding of the same reduction lands elsewhere."""
    exact, exact_grads = logps_and_grads(model, 0, autocast=False)
    full, full_grads = logps_and_grads(model, 0, autocast=True)
    logps, grads = logps_and_grads(model, 5, autocast=True)
    assert logps.dtype == torch.float32  # log-softmax in fp32 whatever the product's dtype
    assert (logps - exact).abs().max() <= 1.5 * (full - exact).abs().max() + 1e-3
    for name, g in exact_grads.items():
        full_error, chunked_error = (full_grads[name] - g).norm(), (grads[name] - g).norm()
        assert chunked_error <= 1.5 * full_error + 1e-3 * g.norm(), (name, chunked_error / full_error)


def test_chunk_arithmetic_is_autograds_and_compiles_to_the_same():
    """The per-chunk functions against autograd of log_softmax in fp64; compiled (as on CUDA, here by the CPU
    compiler) against plain, on two chunk lengths (dynamic shapes) of bf16 logits."""
    torch.manual_seed(0)
    compiled = {name: torch.compile(getattr(lp.ChunkedLogps, name), dynamic=True) for name in ("lse", "grad_logits")}
    for n in (7, 12):
        logits = (3 * torch.randn(n, 300)).bfloat16()
        labels, g = torch.randint(0, 300, (n,)), torch.randn(n)
        exact = logits.double().requires_grad_()
        logp = torch.log_softmax(exact, -1).gather(-1, labels[:, None]).squeeze(-1)
        (logp * g).sum().backward()
        lse = lp.ChunkedLogps.lse(logits)
        assert lse.dtype == torch.float32 and torch.allclose(lse.double(), exact.logsumexp(-1), atol=1e-5)
        grad = lp.ChunkedLogps.grad_logits(logits, lse, labels, g)
        assert grad.dtype == torch.bfloat16 and torch.allclose(grad.double(), exact.grad, atol=1e-2, rtol=1e-2)
        assert torch.allclose(compiled["lse"](logits), lse, atol=1e-5)
        fused_grad = compiled["grad_logits"](logits, lse, labels, g)
        assert torch.allclose(fused_grad.float(), grad.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (./run.sh gpu runs it)")
def test_chunked_on_gpu_matches_within_bf16():
    """On CUDA under bf16 autocast, a Qwen2-shaped model with a 32k vocabulary: the path the GPU runs take."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).cuda()
    fwd, labels = batch(model)
    fwd, labels = {k: v.cuda() for k, v in fwd.items()}, labels.cuda()
    results = []
    for chunk in (0, 40):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps = lp.label_logps(model, fwd, labels, chunk * cfg.vocab_size)
        (logps * torch.linspace(-1.0, 2.0, len(logps), device="cuda")).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (logps, grads) = results
    assert torch.allclose(logps, full, atol=2e-2)
    for name, g in full_grads.items():
        assert (grads[name] - g).abs().max() <= 2e-2 * g.abs().max(), name


def test_frozen_output_embedding_gets_no_gradient_and_costs_no_product(base):
    """Under LoRA the output embedding is frozen: the adapters' gradients are those of the full logits, and backward
    skips the embedding's own gradient, one (positions x vocabulary) by hidden product fewer."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from common import lora
    cfg = SimpleNamespace(lora_r=4, lora_alpha=16.0, lora_targets="all-linear", merge_lora=False)
    wrapped = lora.wrap(AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa"), cfg)
    for p in wrapped.parameters():  # B = 0 at the start would leave A without gradient: a nonzero B for the test
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    full, full_grads = logps_and_grads(wrapped, 0, autocast=False)
    logps, grads = logps_and_grads(wrapped, 7, autocast=False)
    assert torch.allclose(logps, full, atol=1e-5) and grads.keys() == full_grads.keys()
    assert all(".lora_" in name for name in grads)  # the output embedding has none
    for name, g in full_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name

    N, V, H = 40, 100, 16
    h, labels = torch.randn(N, H, requires_grad=True), torch.randint(0, V, (N,))
    flops, grad_h = {}, {}
    for trains in (False, True):
        w = torch.randn(V, H, generator=torch.Generator().manual_seed(0)).requires_grad_(trains)
        logps = lp.ChunkedLogps.apply(h, w, labels, 7)
        with FlopCounterMode(display=False) as counter:
            (grad_h[trains],) = torch.autograd.grad(logps.sum(), h)
        flops[trains] = counter.get_total_flops()
    assert torch.equal(grad_h[False], grad_h[True]) and flops[True] - flops[False] == 2 * N * V * H


def test_empty_selection_keeps_the_graph(model):
    """A micro-batch without labels still runs backward (every FSDP process must) and contributes exactly zero."""
    fwd, labels = batch(model)
    logps = lp.label_logps(model, fwd, torch.full_like(labels, -100), 16 * model.config.vocab_size)
    assert logps.shape == (0,) and logps.requires_grad
    model.zero_grad()
    logps.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_sft_runs_agree_with_and_without_chunks(base, tmp_path):
    args = ["--max_steps", 4, "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--max_len", 128]
    run("sft", "--output_dir", tmp_path / "full", "--loss_chunk", 0, *args)
    run("sft", "--output_dir", tmp_path / "chunked", "--loss_chunk", 1, *args)
    full, chunked = ([m["loss"] for m in metrics(tmp_path / d) if "loss" in m] for d in ("full", "chunked"))
    assert len(full) == 4 and max(abs(a - b) for a, b in zip(full, chunked)) < 1e-5


def test_chunked_under_fsdp_matches_one_process(base, tmp_path):
    """The multi-GPU path on CPU: FSDP2 over 2 gloo processes with the chunked loss (the output embedding read after
    the root's forward, its gradient reduced with the rest) against 1 process with the same 4 rows a step."""
    args = ["--max_steps", 3, "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--max_len", 128,
            "--loss_chunk", 1]
    run("sft", "--output_dir", tmp_path / "one", "--batch_size", 4, *args)
    run("sft", "--output_dir", tmp_path / "two", "--batch_size", 2, *args, nproc=2)
    one, two = ([m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]


def peak_gb(chunk):
    out = subprocess.run([sys.executable, "tests/test_chunked.py", str(chunk)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunked_uses_less_memory(base):
    """One forward and backward of 4 x 1024 labelled positions: the full path holds fp32 logits and their gradient
    (0.5 GB each at this size); the chunked path holds 1024 positions' at a time."""
    full, chunked = peak_gb(0), peak_gb(1024)
    assert abs(full["loss"] - chunked["loss"]) < 1e-3 * abs(full["loss"])
    assert chunked["peak_gb"] < full["peak_gb"] - 0.5, (full, chunked)


def measure(chunk):
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    from common import toy
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32768, max_position_embeddings=1024, tie_word_embeddings=True, **toy.SIZES["large"])
    model = LlamaForCausalLM(cfg)  # fp32, the output embedding tied to the input one
    ids = torch.randint(0, 32768, (4, 1024))
    logps = lp.label_logps(model, {"input_ids": ids}, ids, chunk * 32768)
    loss = -logps.mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    print(json.dumps({"chunk": chunk, "loss": loss.item(), "peak_gb": peak}))


if __name__ == "__main__":
    measure(int(sys.argv[1]))
