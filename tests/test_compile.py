"""--compile: the compiled decoder layers compute the eager model's log-probabilities and gradients."""
import torch
from transformers import AutoModelForCausalLM

from common import dist
from common.logps import label_logps


def logps_and_grads(model, ids, labels, positions):
    model.zero_grad()
    logps = label_logps(model, {"input_ids": ids, "position_ids": positions}, labels, 64 * model.config.vocab_size)
    (logps * torch.linspace(-1.0, 2.0, len(logps))).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_layers_match_eager(base):
    eager = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    compiled = dist.compile_layers(AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa"))
    layers = dist.decoder_layers(compiled)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)  # compiled in place
    torch.manual_seed(0)
    for width, cut in ((48, 20), (80, 33)):  # two packed shapes: dynamic shapes, no recompile error
        ids = torch.randint(3, eager.config.vocab_size, (2, width))
        labels = ids.clone()
        labels[:, :5] = -100
        positions = torch.cat([torch.arange(cut), torch.arange(width - cut)]).repeat(2, 1)
        want, want_grads = logps_and_grads(eager, ids, labels, positions)
        got, grads = logps_and_grads(compiled, ids, labels, positions)
        assert torch.allclose(got, want, atol=1e-4)
        for name, g in want_grads.items():
            assert (grads[name] - g).abs().max() <= 1e-3 * g.abs().max(), name
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # saved checkpoints keep their names
