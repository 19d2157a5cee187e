"""One code path from 1 to N processes; the loss depends on the global batch only; resume is exact."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from util import ROOT, metrics, run

FAST = ["--max_steps", 4, "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--max_len", 128]


def losses(out):
    return [m["loss"] for m in metrics(out) if "loss" in m]


def test_two_processes_match_one(base, tmp_path):
    """FSDP2 over 2 gloo processes, 2 rows each, against 1 process with the same 4 rows a step."""
    run("sft", "--output_dir", tmp_path / "one", "--batch_size", 4, *FAST)
    run("sft", "--output_dir", tmp_path / "two", "--batch_size", 2, *FAST, nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # Adam: 1e-7 in the loss is ~1e-5 in a weight
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "two")).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("script", ["sft", "sft-padded", "rm"])
def test_grad_accum_does_not_change_the_loss(script, sft_run, tmp_path):
    # rm at a small lr: in Adam's first steps a parameter whose gradient is float noise moves by ±lr, so at rm's
    # default 1e-3 summation-order noise alone grows to 1e-4 in the loss by step 3
    model = {"sft": [], "sft-padded": ["--packing", "false"], "rm": ["--model", sft_run, "--lr", 1e-5]}[script]
    script = script.split("-")[0]
    run(script, "--output_dir", tmp_path / "a1", "--batch_size", 4, "--grad_accum", 1, *model, *FAST)
    run(script, "--output_dir", tmp_path / "a4", "--batch_size", 1, "--grad_accum", 4, *model, *FAST)
    a1, a4 = losses(tmp_path / "a1"), losses(tmp_path / "a4")
    # 1.2e-5 apart at worst (sft-padded under ATEN_CPU_CAPABILITY=default): summation order, float32 rounding
    assert max(abs(a - b) for a, b in zip(a1, a4)) < 5e-5
    g1, g4 = ([m["grad_norm"] for m in metrics(tmp_path / d) if "grad_norm" in m] for d in ("a1", "a4"))
    assert len(g1) == 4 and all(abs(a - b) <= 1e-4 * a for a, b in zip(g1, g4))


def test_killed_run_resumes_to_the_same_weights(base, tmp_path):
    args = ["--max_steps", 40, "--save_every", 5, "--log_every", 5, "--eval_every", 0,
            "--batch_size", 4, "--max_len", 128]
    run("sft", "--output_dir", tmp_path / "full", *args)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "algos/sft.py", "--output_dir", str(out), *map(str, args)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoint").exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    log = run("sft", "--output_dir", out, "--resume", "true", *args).stdout
    step = int(log.split("at step ")[1].split()[0])
    assert 0 < step < 40
    w_full, w_res = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert [m["step"] for m in metrics(out)] == [m["step"] for m in metrics(tmp_path / "full")]


GATHER = r'''
import json, sys
import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM
sys.path.insert(0, sys.argv[2])
from common import dist

rank, world, device = dist.setup(0)
model = dist.shard(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32), world, device)
params = list(model.parameters())
gathers = [0]
for name in ("all_gather_single", "all_gather_into_tensor"):  # FSDP2's all-gather: torch 2.13's name, the floor's
    if hasattr(tdist, name):
        def counted(*args, _all_gather=getattr(tdist, name), **kwargs):
            gathers[0] += 1
            return _all_gather(*args, **kwargs)
        setattr(tdist, name, counted)
ids = torch.arange(3, 15).repeat(4, 1) + rank


def loss_and_grad():  # a training forward and backward, FSDP2's hooks and all
    for p in params:  # the sharded parameters, as an optimizer holds them: model.parameters() are the whole ones
        p.grad = None  # while FSDP2 keeps the root whole after a forward under no_grad (the plain sampling)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), dist.clip_grads(model, 1e9).item()


def sample(gather, budget=None):
    torch.manual_seed(0)
    gathers[0] = 0
    with torch.no_grad(), (dist.gathered(model, budget) if gather else torch.enable_grad()):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=True, top_k=0, synced_gpus=True)
    return out.tolist(), gathers[0]


before = loss_and_grad()
plain, n_plain = sample(False)
kept, n_kept = sample(True)
sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
over, n_over = sample(True, budget=1000 if rank == 0 else None)  # too big for one process: none keeps it whole
with open(f"{sys.argv[3]}/rank{rank}.json", "w") as f:  # a file a process: their prints would interleave
    json.dump({"same_samples": plain == kept == over, "plain": n_plain, "kept": n_kept, "over": n_over,
               "sharded_after": sharded, "same_step": before == loss_and_grad()}, f)
dist.barrier()  # ends as the scripts do
dist.close()
'''


def test_sampling_gathers_the_weights_once_not_per_token(base, tmp_path):
    """dist.gathered under FSDP2 (2 gloo processes): a generate of 8 new tokens all-gathers each layer once instead of
    at every token's forward, samples the same tokens, and leaves the model sharded and training as before; a model
    over one process's memory budget keeps the per-token gathering on both."""
    (tmp_path / "gather.py").write_text(GATHER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "gather.py"), str(base), ROOT, str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        f = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert f["same_samples"] and f["sharded_after"] and f["same_step"]
        assert f["plain"] >= 8 * 2 and f["kept"] <= 2  # the toy model's 2 layers: per token before, once now
        assert f["over"] == f["plain"]  # over budget: FSDP2's per-token gathering, on both processes
