"""Sampling completions: batched generation with the KV cache, the bf16 copy that samples on a GPU, and what the
sampling scripts read off their samples.

What it holds and guarantees:
  - generate: G samples of each prompt in one call, prompts left-padded and prefilled once (a dynamic cache) or
    per row (a fixed-size cache, compiled decode on CUDA); the same seed gives the same samples either way
    (tests/test_rl.py); under FSDP2 the weights are gathered once per call, not per token; on request, the log-prob
    of each sampled token under the distribution it was drawn from (tempered, top-p truncated, the sampler's dtype);
  - bf16_sampler: the policy's weights in bf16 for that decode, refreshed in place after each update;
  - rm_scores: a reward model's score of each completion, read where rm.py trains its head to read;
  - distinct2: the share of distinct bigrams among a group's samples (mode collapse shows as a fall).
"""
import copy

import torch
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from common import dist


class SampledLogps(LogitsProcessor):
    """Placed after the temperature and top-p warpers, it sees the scores each token is drawn from; it keeps their
    log-softmax until the next call, whose input ends with the token drawn (the last one is read by finish)."""

    def __init__(self):
        self.last, self.picked = None, []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.picked.append(self.last.gather(-1, input_ids[:, -1:]))
        self.last = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, comp_NC):
        return torch.cat(self.picked + [self.last.gather(-1, comp_NC[:, -1:])], 1)


@torch.no_grad()
def generate(model, prompts, G, tok, gen_cfg, device, synced=False, static_len=0, sampled_logps=False):
    """Batched sampling with the KV cache: prompts left-padded, each prefilled once and its cache copied to its G rows.
    static_len > 0: a fixed-size cache of that many positions instead, with which transformers compiles the decode
    step on CUDA (CUDA graphs: one launch per token instead of one per kernel; the first call compiles); every row
    then prefills its own copy of the prompt, a small cost beside the decode. Sampling runs without autocast, in the
    weights' own dtype (the policy's fp32, or bf16 through bf16_sampler): under autocast the weights would be cast
    again at every token, and keys (fp32 after RoPE) and values (bf16) would disagree in a fixed-size cache.
    -> completions comp_NC (N = B·G, a prompt's samples consecutive), mask_NC (the tokens up to and including the
    first EOS; padding after it excluded), ended_N (an EOS was produced); with sampled_logps also logps_NC, the
    sampler's log-prob of each token: the temperature and top-p warpers then run as explicit processors ahead of
    SampledLogps, in the order generate would run them itself, so the samples are the same."""
    width = max(map(len, prompts))
    x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    recorder, processors = None, {}
    if sampled_logps:
        recorder = SampledLogps()
        warpers = [TemperatureLogitsWarper(gen_cfg.temperature)] if gen_cfg.temperature != 1.0 else []
        warpers += [TopPLogitsWarper(gen_cfg.top_p)] if gen_cfg.top_p < 1.0 else []
        gen_cfg = copy.deepcopy(gen_cfg)
        gen_cfg.temperature, gen_cfg.top_p = 1.0, 1.0  # applied by the processors instead
        processors = {"logits_processor": LogitsProcessorList(warpers + [recorder])}
    with dist.gathered(model):  # under FSDP2: the weights gathered once for all tokens, not at every token
        if static_len:
            cache = StaticCache(config=model.config, max_cache_len=static_len)
        else:
            cache = DynamicCache(config=model.config)
            prefix_pos = (attn[:, :-1].cumsum(-1) - 1).clamp(min=0)
            model(input_ids=x[:, :-1], attention_mask=attn[:, :-1], position_ids=prefix_pos, use_cache=True,
                  **dist.cache_kwarg(model, cache))
            cache.batch_repeat_interleave(G)
        out = model.generate(input_ids=x.repeat_interleave(G, 0), attention_mask=attn.repeat_interleave(G, 0),
                             generation_config=gen_cfg, synced_gpus=synced, **processors,
                             **dist.cache_kwarg(model, cache))
    comp_NC, C = out[:, width:], out.shape[1] - width
    is_eos = comp_NC == tok.eos_token_id
    ended_N = is_eos.any(-1)
    first_N = torch.where(ended_N, is_eos.int().argmax(-1), C)
    mask_NC = torch.arange(C, device=device)[None] <= first_N[:, None]
    if recorder is not None:
        return comp_NC, mask_NC, ended_N, recorder.finish(comp_NC).masked_fill(~mask_NC, 0.0)  # pads: 0, not -inf
    return comp_NC, mask_NC, ended_N


@torch.no_grad()
def bf16_sampler(model, sampler=None):
    """The policy's weights in bf16 for sampling with the fixed-size cache: a copy of the module whose parameters are
    bf16 casts (no fp32 duplicate is made; tied weights stay tied), built on the first call and refreshed in place
    from the policy on each later one. With fp32 weights every decode product and the attention
    would run on the GPU's fp32 cores; bf16 puts them on the tensor cores, at the precision of the bf16-autocast
    forwards that score the samples. Costs 2 bytes a parameter."""
    if sampler is None:
        bf16 = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in model.parameters()}
        return copy.deepcopy(model, bf16).eval()
    for s, p in zip(sampler.parameters(), model.parameters()):
        s.copy_(p)
    return sampler


@torch.no_grad()
def rm_scores(rm, prompts, comp_NC, mask_NC, G, pad_id, device):
    """r_ψ(x, y) of each completion: its left-padded prompt and its tokens up to the end-of-turn token, read by the
    reward model's head at the last non-pad token (where rm.py trained it to read)."""
    width = max(map(len, prompts))
    lens_N = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(G)
    prompt_NW = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device).repeat_interleave(G, 0)
    ids = torch.cat([prompt_NW, torch.where(mask_NC, comp_NC, pad_id)], 1)
    attn = torch.cat([(torch.arange(width, device=device) >= width - lens_N[:, None]).long(), mask_NC.long()], 1)
    with dist.autocast(device):
        out = rm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    return out.logits[:, 0].float()


def distinct2(comps):
    """Distinct bigrams over all bigrams of one group's completions (1: all different, low: mode collapse)."""
    grams = [tuple(c[j:j + 2]) for c in comps for j in range(len(c) - 1)]
    return len(set(grams)) / max(len(grams), 1)
