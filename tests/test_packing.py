"""Packing: documents never see each other, and the packed loss is the padded loss."""
import math

import torch
from util import chat

from algos.sft import sft_loss
from common.packing import fit, pack, pad
from common.template import IGNORE, encode_chat

CONVS = [chat("What is 1+2?", "1+2=3"), chat("sys:Be brief.", "What is 40+2?", "40+2=42", "And 9-3?", "9-3=6"),
         chat("What is 99-98?", "99-98=1"), chat("What is 5+5?", "5+5=10", "Double it?", "10+10=20"), chat("What is 0+0?", "0+0=0")]


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
        packed = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
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
        lp = sft_loss(model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits, rows["labels"], n)
        lb = sft_loss(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits, padded["labels"], n)
    assert abs(lp.item() - lb.item()) < 1e-5


def test_sft_loss_by_hand():
    # one row, vocab 3; logits at t predict the label at t+1
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 2, IGNORE, 0]])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse2 = math.log(math.exp(5) + 2 * math.exp(1))
    by_hand = ((lse0 - 3.0) + (lse2 - 5.0)) / 2
    assert abs(sft_loss(logits, labels, 2).item() - by_hand) < 1e-6
    assert abs(sft_loss(logits, labels, 4).item() - by_hand / 2) < 1e-6  # the denominator is the global count given
