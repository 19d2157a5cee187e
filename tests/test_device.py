"""The habits that keep one code path correct on CPU and CUDA, checked where a CPU can see them.

A CPU run cannot notice a CPU tensor meeting CUDA ones, so the habit that prevents it is checked on the source:
every tensor factory in algos/ names its device (the model's, or "cpu" on purpose), and metrics are named sums
(dist.Sums) that move whatever they are given to the model's device.
"""
import ast
import glob
import os

import pytest
import torch
from util import ROOT

from common import dist

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "arange", "empty", "randperm", "rand", "randn",
             "randint", "linspace", "eye"}
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "algos", "*.py")))


def factory_calls_without_device(source):
    """(line, call) of every torch.<factory>(...) without a device= keyword."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            found.append((node.lineno, ast.unparse(node)[:80]))
    return found


def test_the_check_sees_a_missing_device():
    bad = "import torch\nx = torch.tensor([1.0])\ny = torch.zeros(3, device=d)\nz = torch.zeros_like(y)\n"
    assert [line for line, _ in factory_calls_without_device(bad)] == [2]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_every_tensor_factory_names_its_device(path):
    with open(path) as f:
        missing = factory_calls_without_device(f.read())
    assert not missing, f"{os.path.basename(path)}: tensors created without device=: {missing}"


def test_no_line_over_120_columns():
    long = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*", "*.py"))):
        with open(path) as f:
            name = os.path.relpath(path, ROOT)
            long += [f"{name}:{i}" for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > 120]
    assert not long, f"lines over 120 columns: {long[:20]} ({len(long)} in all)"


def test_named_sums_take_numbers_and_tensors_from_any_device():
    sums = dist.Sums(torch.device("cpu"))
    sums.add({"pairs": 3, "logps/chosen": torch.tensor([-1.0, -2.0]).sum()})
    sums.add({"pairs": 2, "logps/chosen": torch.tensor(-0.5, requires_grad=True)})
    assert sums.reduce() == {"logps/chosen": -3.5, "pairs": 5.0}
    assert all(v.device.type == "cpu" and not v.requires_grad for v in sums.values.values())
    if torch.cuda.is_available():  # on a GPU: CPU values join CUDA sums without a device error
        on_gpu = dist.Sums(torch.device("cuda"))
        on_gpu.add({"n": torch.tensor(1.0), "x": torch.ones(2, device="cuda").sum()})
        assert on_gpu.reduce() == {"n": 1.0, "x": 2.0}


def test_cache_keyword_is_one_this_transformers_knows(model):
    import inspect
    (name,) = dist.cache_kwarg(model, None)
    assert name in inspect.signature(type(model).forward).parameters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host waits for a GPU only where there is one")
def test_a_training_step_waits_for_the_gpu_no_more_than_the_models_forward(tok, base):
    """dpo's step (collate, chunked log-probs, the loss, backward, clipping, the fused AdamW update, named sums), which
    sft's and the other preference scripts' share, makes the host wait for the GPU no more often than the model's
    forward alone does (transformers checks packed position_ids on the host, once a forward). Each wait empties the
    GPU's queue: the host can no longer run ahead of it."""
    import warnings

    from transformers import AutoModelForCausalLM

    from algos import dpo
    from common.logps import label_logps, seq_logps
    from common.packing import collate
    from common.template import encode_response
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=dist.attn_impl(device)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    chats = (("What is 1+2?", "1+2=3"), ("What is 40+2?", "40+2=42"), ("What is 9-8?", "2"), ("What is 7+7?", "15"))
    seqs = [encode_response(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}])
            for q, a in chats]  # pairs (0, 2) and (1, 3): chosen first, as dpo.py orders a micro-batch
    ref = torch.tensor([-3.0, -4.0, -5.0, -6.0], device="cpu")  # as dpo.py keeps the reference log-probs
    packed = dist.attn_impl(device) != "sdpa"

    def forward():
        fwd, _, _ = collate(seqs, tok.pad_token_id, packed, device)
        with torch.no_grad(), dist.autocast(device):
            model(**fwd, use_cache=False)

    def step():
        fwd, labels, seq = collate(seqs, tok.pad_token_id, packed, device)
        with dist.autocast(device):
            logps_N = label_logps(model, fwd, labels, 16 * model.config.vocab_size)
        (logps_c, logps_r), _ = (x.chunk(2) for x in seq_logps(logps_N, labels, seq, len(seqs)))
        ref_c, ref_r = dist.to_device(ref, device).chunk(2)
        loss, rewards_c, rewards_r = dpo.dpo_loss(logps_c, logps_r, ref_c, ref_r, 0.1, 2)
        loss.backward()
        dist.clip_grads(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.Sums(device).add({"loss": loss.detach(), "pairs": 2, "right": (rewards_c > rewards_r).sum()})

    def waits(fn):
        fn()  # first calls (lazy initialisation, compiling the chunk arithmetic) are not counted
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]

    assert len(waits(step)) <= len(waits(forward)), waits(step)
