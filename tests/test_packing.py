"""Packing: documents never see each other, and the packed loss is the padded loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from util import chat

from algos.sft import sft_loss
from common.logps import label_logps, token_logps
from common.packing import boundaries as packing_boundaries
from common.packing import fit, pack, pad
from common.template import IGNORE, encode_chat

CONVS = [chat("What is 1+2?", "1+2=3"), chat("sys:Be brief.", "What is 40+2?", "40+2=42", "And 9-3?", "9-3=6"),
         chat("What is 99-98?", "99-98=1"), chat("What is 5+5?", "5+5=10", "Double it?", "10+10=20"),
         chat("What is 0+0?", "0+0=0")]


def docs(tok):
    return [encode_chat(tok, c) for c in CONVS]


def test_best_fit_layout(tok):
    d = docs(tok)
    rows = pack(d, 96, tok.pad_token_id)
    seen = []
    for r, cu in enumerate(rows["cu_seqlens"]):
        pos, ids, labels = rows["position_ids"][r], rows["input_ids"][r], rows["labels"][r]
        for a, b in zip(cu[:-1], cu[1:]):
            assert pos[a:b].tolist() == list(range(b - a))  # positions restart per document (and per pad tail)
            assert labels[a] == IGNORE  # first label of each segment ignored
            seen.append(ids[a:b].tolist())
        assert rows["n_real"][r] == sum(len(x) for x in seen[-(len(cu) - 1):] if x[0] != tok.pad_token_id)
    assert sorted(i for i, _ in d) == sorted(s for s in seen if s[0] != tok.pad_token_id)
    assert len(rows["input_ids"]) < len(d)  # several documents share a row
    assert sum(len(i) for i, _ in d) == rows["n_real"].sum()


def test_overlong_documents_truncated_or_dropped_and_counted(tok):
    d = docs(tok)
    longest = max(len(i) for i, _ in d)
    kept, n = fit(d, longest - 1, truncate=True)
    assert n == 1 and len(kept) == len(d) and max(len(i) for i, _ in kept) == longest - 1
    kept, n = fit(d, longest - 1, truncate=False)
    assert n == 1 and len(kept) == len(d) - 1


def test_packed_logits_equal_each_document_alone(tok, model):
    d = docs(tok)
    rows = pack(d, 96, tok.pad_token_id)
    with torch.no_grad():
        # as sft.py calls it; sdpa ignores the boundaries
        packed = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False,
                       **packing_boundaries(rows["position_ids"], "cpu")).logits
        alone = {tuple(i): model(input_ids=torch.tensor([i]), use_cache=False).logits[0] for i, _ in d}
        # the case that breaks it: with the cache on (eval-mode default), the block-diagonal mask is not built
        leaky = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=True).logits
    worst, worst_leaky = 0.0, 0.0
    for r, cu in enumerate(rows["cu_seqlens"]):
        for a, b in zip(cu[:-1], cu[1:]):
            key = tuple(rows["input_ids"][r, a:b].tolist())
            if key in alone:
                worst = max(worst, (packed[r, a:b] - alone[key]).abs().max().item())
                worst_leaky = max(worst_leaky, (leaky[r, a:b] - alone[key]).abs().max().item())
    assert worst < 1e-4
    assert worst_leaky > 1e-2  # so the use_cache=False guard in sft.py is what keeps documents apart


def test_packed_loss_equals_padded_loss(tok, model):
    d = docs(tok)
    rows, padded = pack(d, 96, tok.pad_token_id), pad(d, tok.pad_token_id)
    n = (padded["labels"][:, 1:] != IGNORE).sum().item()
    assert n == (rows["labels"][:, 1:] != IGNORE).sum().item()
    with torch.no_grad():
        packed = label_logps(model, {k: rows[k] for k in ("input_ids", "position_ids")}, rows["labels"], 0)
        lp = sft_loss(packed, n)
        padded_logps = label_logps(model, {k: padded[k] for k in ("input_ids", "attention_mask")}, padded["labels"], 0)
        lb = sft_loss(padded_logps, n)
    assert abs(lp.item() - lb.item()) < 1e-5


def test_sft_loss_by_hand():
    # one row, vocab 3; logits at t predict the label at t+1
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 2, IGNORE, 0]])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse2 = math.log(math.exp(5) + 2 * math.exp(1))
    by_hand = ((lse0 - 3.0) + (lse2 - 5.0)) / 2
    mask = labels[:, 1:] != IGNORE
    logps = token_logps(logits[:, :-1][mask], labels[:, 1:][mask])  # as label_logps takes them from full logits
    assert abs(sft_loss(logps, 2).item() - by_hand) < 1e-6
    assert abs(sft_loss(logps, 4).item() - by_hand / 2) < 1e-6  # the denominator is the global count given


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), is_causal=False,
                     enable_gqa=False):
    """What PyTorch's varlen kernel computes (causal attention inside each segment), on the CPU, in fp32, with the
    kernel's own requirements checked: bf16/fp16 inputs, int32 boundaries, the longest segment given."""
    assert q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == int(cu_q.diff().max())
    assert window_size == (-1, 0) or is_causal
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seg = [x[a:b].transpose(0, 1).float() for x in (q, k, v)]  # (H, n, D)
        out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1).to(q.dtype)
    return out


def test_varlen_attention_keeps_documents_apart(tok, monkeypatch):
    """The GPU path without flash-attn (common.packing.varlen_attention) on the CPU, its kernel replaced by the
    reference above: packed rows give each document's own logits, with the boundaries passed explicitly (as sft.py
    does) and derived from position_ids; a padded batch takes sdpa's path. A grouped-query model, so the kv-head
    expansion of older torch releases is exercised too. The real kernel is checked on a GPU by ./run.sh gpu."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import packing
    monkeypatch.setattr(packing, "_kernel", lambda: reference_varlen)
    assert packing.register_varlen()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    sdpa = LlamaForCausalLM(cfg).eval()
    cfg._attn_implementation = "varlen"
    varlen = LlamaForCausalLM(cfg).eval()
    varlen.load_state_dict(sdpa.state_dict())
    d = docs(tok)
    rows = pack(d, 96, tok.pad_token_id)
    with torch.no_grad():
        alone = {tuple(i): sdpa(input_ids=torch.tensor([i]), use_cache=False).logits[0] for i, _ in d}
        explicit = varlen(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False,
                          **packing.boundaries(rows["position_ids"], "cpu")).logits
        derived = varlen(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
        padded = pad(d, tok.pad_token_id)
        padded_kw = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "use_cache": False}
        assert torch.equal(varlen(**padded_kw).logits, sdpa(**padded_kw).logits)  # padding: sdpa, unchanged
    for logits in (explicit, derived):
        worst = 0.0
        for r, cu in enumerate(rows["cu_seqlens"]):
            for a, b in zip(cu[:-1], cu[1:]):
                key = tuple(rows["input_ids"][r, a:b].tolist())
                if key in alone:
                    worst = max(worst, (logits[r, a:b] - alone[key]).abs().max().item())
        assert worst < 0.05  # bf16 attention inside, fp32 elsewhere; a leak between documents moves logits by ~1


def test_boundaries_of_packed_rows(tok):
    rows = pack(docs(tok), 96, tok.pad_token_id)
    b = packing_boundaries(rows["position_ids"], "cpu")
    flat = [r * 96 + c for r, cu in enumerate(rows["cu_seqlens"]) for c in cu[:-1]] + [rows["input_ids"].numel()]
    assert b["cu_seq_lens_q"].tolist() == flat and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == max(y - x for cu in rows["cu_seqlens"] for x, y in zip(cu[:-1], cu[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (./run.sh gpu runs it)")
@pytest.mark.parametrize("impl", ["sdpa", "varlen", "flash_attention_2"])
def test_packed_logits_equal_per_document_on_gpu(impl):
    """On CUDA under bf16 autocast, the way sft.py calls it (explicit boundaries), for each attention path present:
    packed rows of several documents give each document's own logits. The same rows without boundaries and with
    position_ids running across the row (documents attending to each other) must fail the same check."""
    import importlib.util

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common import packing
    if impl == "varlen" and not packing.register_varlen():
        pytest.skip("torch < 2.10 has no varlen attention")
    if impl == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=impl).cuda().eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 1000, (n,), generator=g, device="cpu").tolist() for n in (300, 17, 200, 64, 411, 5, 90)]
    rows = pack([(d, d) for d in docs], 512, 0)
    ids, pos = rows["input_ids"].cuda(), rows["position_ids"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(input_ids=ids, position_ids=pos.cuda(), use_cache=False,
                       **packing.boundaries(pos, "cuda")).logits.float()
        leaky = model(input_ids=ids, use_cache=False).logits.float()
        alone = [model(input_ids=torch.tensor([d], device="cuda"), use_cache=False).logits[0].float() for d in docs]

    def worst(logits):
        err = 0.0
        for r, cu in enumerate(rows["cu_seqlens"]):
            for a, b in zip(cu[:-1], cu[1:]):
                seq = rows["input_ids"][r, a:b].tolist()
                if seq in docs:
                    ref = alone[docs.index(seq)]
                    err = max(err, ((logits[r, a:b] - ref).norm() / ref.norm()).item())
        return err
    assert worst(packed) < 2e-2  # bf16 noise between kernels
    assert worst(leaky) > 0.1  # the check sees documents attending to each other


def test_packed_preference_batch_equals_padded(tok, model):
    """The sequences of a preference micro-batch packed into one row give each sequence's summed log-probability and
    response length exactly as right-padded rows do (per-document attention, no cross-talk), and gradients too."""
    from common.logps import label_logps, seq_logps
    from common.packing import collate
    from common.template import encode_response
    seqs = [encode_response(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}])
            for q, a in (("What is 1+2?", "1+2=3"), ("What is 40+2?", "40+2=42 is the answer"),
                         ("What is 99-98?", "1"), ("Hi", "Hello there, how are you?"))]
    results = {}
    for packing in (True, False):
        fwd, labels, seq = collate(seqs, tok.pad_token_id, packing, torch.device("cpu"))
        assert fwd["input_ids"].shape[0] == (1 if packing else len(seqs))
        model.zero_grad()
        logps, lens = seq_logps(label_logps(model, fwd, labels, 16 * model.config.vocab_size), labels, seq, len(seqs))
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        results[packing] = logps.detach(), lens, {n: p.grad.clone() for n, p in model.named_parameters()}
    (packed, packed_lens, packed_grads), (padded, padded_lens, padded_grads) = results[True], results[False]
    assert packed_lens.tolist() == padded_lens.tolist() == [sum(l != IGNORE for l in lab[1:]) for _, lab in seqs]
    assert torch.allclose(packed, padded, atol=1e-4)
    for name, g in padded_grads.items():
        assert (packed_grads[name] - g).abs().max() <= 1e-3 * g.abs().max(), name
