"""Packing tokenized documents into rows of max_len tokens, and the plain padded batch.

A packed row holds several documents back to back. position_ids restart at 0 for each, which is
what lets transformers (sdpa: a block-diagonal mask; flash-attn: varlen kernels) keep each
document's attention inside itself, provided the forward gets no attention_mask and no cache
(`use_cache=False`). The first label of every document is ignored, so no document is trained to
predict its first token from the previous document's last one.
"""
import bisect

import torch

from common.template import IGNORE


def fit(docs, max_len, truncate=True):
    """Documents longer than max_len truncated (or dropped); returns (docs, number affected)."""
    out = [(ids[:max_len], labels[:max_len]) for ids, labels in docs if truncate or len(ids) <= max_len]
    return out, sum(len(ids) > max_len for ids, _ in docs)


def pack(docs, max_len, pad_id):
    """Best-fit decreasing: each document, longest first, goes to the row it fills most tightly."""
    rows, free = [], []  # free: sorted (room left, row index)
    for i in sorted(range(len(docs)), key=lambda i: -len(docs[i][0])):
        n = len(docs[i][0])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(free, (room - n, r))
    ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    pos = torch.zeros_like(ids)
    cu_seqlens = []
    for r, members in enumerate(rows):
        at, cu = 0, [0]
        for i in members:
            d_ids, d_labels = docs[i]
            n = len(d_ids)
            ids[r, at:at + n] = torch.tensor(d_ids)
            labels[r, at + 1:at + n] = torch.tensor(d_labels[1:], dtype=torch.long)  # first label ignored
            pos[r, at:at + n] = torch.arange(n)
            at += n
            cu.append(at)
        pos[r, at:] = torch.arange(max_len - at)  # the pad tail is a segment of its own, with no labels
        cu_seqlens.append(cu + ([max_len] if at < max_len else []))
    n_real = torch.tensor([sum(len(docs[i][0]) for i in members) for members in rows])  # non-pad tokens per row
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu_seqlens, "n_real": n_real}


def pad(docs, pad_id):
    """Right-padded batch of the documents, as long as the longest."""
    width = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels, mask = torch.full_like(ids, IGNORE), torch.zeros_like(ids)
    for r, (d_ids, d_labels) in enumerate(docs):
        ids[r, :len(d_ids)], labels[r, :len(d_ids)], mask[r, :len(d_ids)] = (
            torch.tensor(d_ids), torch.tensor(d_labels, dtype=torch.long), 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
