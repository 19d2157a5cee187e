"""Packing tokenized documents into rows of max_len tokens, the plain padded batch, and collation of sequences.

A packed row holds several documents back to back, position_ids restarting at 0 for each. Each
attention path keeps every document's attention inside itself, provided the forward gets no
attention_mask and no cache (`use_cache=False`):
  - sdpa (CPU): transformers builds a block-diagonal mask from position_ids;
  - flash-attn, and PyTorch's varlen FlashAttention (`varlen_attention` below, GPU without
    flash-attn): the document boundaries are passed explicitly (`boundaries`: cu_seqlens and the
    longest document), since transformers infers them from position_ids only for a batch of one row.
The first label of every document is ignored, so no document is trained to predict its first token
from the previous document's last one.
"""
import bisect
import inspect

import torch

from common import dist
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


def boundaries(position_ids_BT, device):
    """Forward kwargs naming every document of packed rows (position_ids on the CPU, restarting at 0 per document):
    cumulative lengths over the rows flattened into one sequence, and the longest document, as flash-attn's varlen
    kernels take them. sdpa ignores them (it masks from position_ids); computed on the CPU, so no device sync."""
    pos = position_ids_BT.reshape(-1)
    starts = torch.nonzero(pos == 0).reshape(-1)  # every row starts a document, so row ends are boundaries too
    cu = torch.cat([starts, torch.tensor([len(pos)])]).to(torch.int32)
    longest = int(cu.diff().max())
    cu = dist.to_device(cu, device)  # pinned and asynchronous: no wait for the GPU
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def collate(seqs, pad_id, packing, device):
    """Sequences (ids, labels) -> (forward kwargs on the device, labels_BT, seq_BT: the sequence each position
    belongs to; these two on the CPU, where common.logps.label_logps and seq_logps read them).
    Packed: one row of every sequence back to back, each a document of its own (position_ids restart at 0; varlen
    attention keeps them apart by their boundaries, sdpa by a mask from position_ids), so no padding is computed.
    Else right-padded rows, as long as the longest sequence.
    Built on the CPU and copied with dist.to_device (pinned, asynchronous: no wait for the GPU)."""
    if packing:
        lengths = torch.tensor([len(ids) for ids, _ in seqs], device="cpu")
        pos = torch.cat([torch.arange(n, device="cpu") for n in lengths.tolist()])[None]
        ids = torch.tensor([[t for ids, _ in seqs for t in ids]], device="cpu")
        labels = torch.tensor([[t for _, lab in seqs for t in lab]], device="cpu")
        seq = torch.repeat_interleave(torch.arange(len(seqs), device="cpu"), lengths)[None]
        fwd = {"input_ids": dist.to_device(ids, device), "position_ids": dist.to_device(pos, device),
               **boundaries(pos, device)}
        return fwd, labels, seq
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in seqs], device="cpu")
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in seqs], device="cpu")
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs], device="cpu")
    seq = torch.arange(len(seqs), device="cpu")[:, None].expand(-1, width)
    fwd = {"input_ids": dist.to_device(ids, device), "attention_mask": dist.to_device(mask, device)}
    return fwd, labels, seq


def _kernel():
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over PyTorch's varlen FlashAttention (registered as "varlen").

    Unpadded forwards without a cache (packed training rows, full rows) run the varlen kernel, one causal segment
    per document: boundaries from the kwargs of `boundaries`, else from position_ids. Anything else (a padding
    mask, a 4D mask, decoding with a cache) is sdpa's, unchanged. query (B, H, T, D) -> output (B, T, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, T, D = query.shape
    if attention_mask is not None or key.shape[2] != T or T == 1 or dropout > 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        cu = boundaries(kwargs["position_ids"].expand(B, T).cpu(), query.device)
        cu, longest = cu["cu_seq_lens_q"], cu["max_length_q"]
    # The kernel takes bf16/fp16 only. RoPE runs in fp32 and promotes q/k under autocast, so cast to the autocast
    # dtype (bf16 when none is active) and the output back to the dtype the model computes in.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D).to(dtype) for x in (query, key, value))
    params = inspect.signature(_kernel()).parameters
    extra = {}
    if k.shape[1] != H:  # grouped-query attention: torch 2.12 takes it natively, earlier releases need it expanded
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    if "window_size" in params:  # torch >= 2.11: (-1, 0) is causal; torch 2.10 took is_causal
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    out = _kernel()(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    return out.view(B, T, H, D).to(value.dtype), None


def register_varlen():
    """Make "varlen" an attn_implementation transformers knows; False where torch has no varlen kernel (< 2.10)."""
    try:
        _kernel()
    except ImportError:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(*args, **kwargs):  # no padding: no mask (the kernel is causal per segment); padding: sdpa's mask
        given = inspect.signature(sdpa_mask).bind(*args, **kwargs).arguments
        return None if given.get("attention_mask") is None else sdpa_mask(*args, **kwargs)

    AttentionInterface.register("varlen", varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen", mask)
    return True
