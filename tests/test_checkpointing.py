"""--gradient_checkpointing: the same loss and gradients, layers really recomputed in the RL updates, every script.

transformers checkpoints a decoder layer only while it is in train mode, so the RL scripts, whose models otherwise
run in eval mode, switch the policy (and PPO's critic) to train mode for the update only: the checks count the
layer forwards that build a graph, which run twice per update forward when checkpointing works.
"""
import importlib
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP
from util import head, metrics

from common import dist


def loss_and_grads(base, checkpointing):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").train()
    if checkpointing:
        dist.gradient_checkpointing(model)
    calls = []  # a layer's MLP runs inside the checkpoint: twice with checkpointing (once more in backward)
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_same_loss_and_gradients_with_checkpointing(base):
    loss, grads, calls = loss_and_grads(base, False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(base, True)
    n_layers = AutoConfig.from_pretrained(base).num_hidden_layers
    assert calls == n_layers and calls_ckpt == 2 * n_layers  # every layer recomputed once in backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rl_update_recomputes_layers_and_generates_in_eval_mode(checkpointing, base, tmp_path):
    """grpo, two steps of one micro-batch each: each update forward builds a graph through every layer once, and once
    more in backward when checkpointing; the rollouts' forwards (no graph), the second one after an update, run every
    layer in eval mode (generate keeps its KV cache)."""
    from algos import grpo

    seen = []  # (builds a graph, train mode) of every forward of a layer's MLP, which runs inside the checkpoint

    def record(module, _):
        if isinstance(module, LlamaMLP):
            seen.append((torch.is_grad_enabled(), module.training))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        grpo.main(grpo.parse_args([
            "--model", base, "--data", head("rl.jsonl", tmp_path / "rl.jsonl", 4), "--output_dir", tmp_path / "out",
            "--batch_size", 2, "--group_size", 2, "--max_new_tokens", 4, "--max_steps", 2, "--save_every", 0,
            "--beta", 0, "--gradient_checkpointing", checkpointing]))
    finally:
        hook.remove()
    n_layers = AutoConfig.from_pretrained(base).num_hidden_layers
    with_graph = [training for grad, training in seen if grad]
    assert with_graph == [checkpointing] * 2 * n_layers * (2 if checkpointing else 1)
    without_graph = [training for grad, training in seen if not grad]
    assert without_graph and not any(without_graph)


RL = ["--data", "rl.jsonl", "--batch_size", 2, "--group_size", 2, "--max_new_tokens", 4]
PREFS = ["--data", "prefs.jsonl", "--batch_size", 2]
CASES = {  # script -> arguments for one step on a few records (data files cut to their first 8 lines)
    "sft": ["--data", "sft.jsonl", "--batch_size", 2, "--max_len", 64],
    "rm": PREFS, "dpo": PREFS, "ipo": PREFS, "orpo": PREFS, "simpo": PREFS,
    "kto": ["--data", "kto.jsonl", "--batch_size", 2],
    "grpo": RL, "rloo": RL, "remax": RL,
    "ppo": RL + ["--reward", "verifier", "--num_minibatches", 1, "--ppo_epochs", 1],
    "distill": ["--data", "sft.jsonl", "--batch_size", 2, "--max_new_tokens", 4, "--mode", "on_policy"],
    "online_dpo": ["--data", "rl.jsonl", "--batch_size", 2, "--max_new_tokens", 4],
}


@pytest.mark.parametrize("script", CASES)
def test_every_script_runs_with_checkpointing(script, base, tmp_path):
    """In process, as `python algos/<script>.py ... --gradient_checkpointing true` (no interpreter start-up each)."""
    args = [head(a, tmp_path / a, 8) if str(a).endswith(".jsonl") else a for a in CASES[script]]
    args += ["--teacher", base] if script == "distill" else []
    algo = importlib.import_module(f"algos.{script}")
    algo.main(algo.parse_args(["--model", base, "--output_dir", tmp_path / "out", "--max_steps", 1, "--log_every", 1,
                               "--save_every", 0, "--gradient_checkpointing", "true", *args]))
    m = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert len(m) == 1 and math.isfinite(m[0]["loss"])
