"""Log-probabilities of tokens, computed without full-vocabulary fp32 log-softmax: the machinery every script that
trains on log-probs shares.

What it holds and guarantees:
  - token_logps: log p(label) = logit[label] - logsumexp(logits), the plain reference, in chunks of positions;
  - ChunkedLogps / label_logps: the same log-probs from the final hidden states and the output embedding, a chunk
    of positions (forward) or of the vocabulary (backward) at a time, so memory grows with the chunk, not with
    tokens x vocabulary; tests/test_chunked.py holds it equal to the model's full logits in values and gradients;
  - seq_logps, sequence_logps, all_logps: per-sequence sums of those log-probs and response lengths, for one
    micro-batch or for a whole data set split over processes;
  - logps_entropy: log-probs of sampled tokens under the tempered softmax, and the entropy, in chunks;
  - group_rows / sharing_pays / completion_logps: the log-probs of G sampled completions of each prompt in one
    forward without cache, the prompt computed once for its group where that saves compute.
"""
import torch

from common import dist
from common.packing import collate
from common.template import IGNORE


def token_logps(logits_NV, labels_N, chunk=4096):
    """log p(label) = logit[label] - logsumexp(logits), in chunks, so no full fp32 log-softmax exists."""
    out = []
    for i in range(0, max(len(labels_N), 1), chunk):
        logits_CV = logits_NV[i:i + chunk]
        picked_C = logits_CV.gather(-1, labels_N[i:i + chunk, None]).squeeze(-1).float()
        out.append(picked_C - torch.logsumexp(logits_CV.float(), dim=-1))
    return torch.cat(out)


class ChunkedLogps(torch.autograd.Function):
    """log p(y_n) = h_n·w_{y_n} - logsumexp_v h_n·w_v for N positions, from hidden states h (N, H) and the output
    embedding w (V, H), `chunk` positions at a time. Forward keeps only each position's logsumexp; backward
    recomputes the logits as many at a time, a slice of the vocabulary for all N positions, so each slice of ∂/∂w
    is one product written once and only ∂/∂h (N x H) accumulates. So memory grows with chunk x V instead of N x V,
    for one more h·w product. Gradients:
        ∂log p(y_n)/∂logits_n = onehot(y_n) - softmax(logits_n),
        ∂/∂h_n = (...)·w,  ∂/∂w = Σ_n (...)ᵀ h_n.
    The matrix products run in the autocast dtype when autocast is on (forward decides; backward follows). The
    arithmetic over a chunk's logits (logsumexp; softmax, one-hot and cast in backward) is compiled on CUDA, one
    pass over the chunk instead of several in fp32."""

    compiled = {}

    @staticmethod
    def lse(logits_CV):
        """logsumexp over the vocabulary, in fp32 whatever the logits' dtype."""
        return torch.logsumexp(logits_CV.float(), dim=-1)

    @staticmethod
    def grad_logits(logits_CV, lse_C, labels_C, g_C):
        """g_n·(onehot(y_n) - softmax(logits_n)), computed in fp32 and returned in the logits' dtype. One pointwise
        expression (the one-hot as a comparison with the vocabulary index), so the compiled version is one kernel."""
        onehot = torch.arange(logits_CV.shape[-1], device=logits_CV.device) == labels_C[:, None]
        softmax = torch.exp(logits_CV.float() - lse_C[:, None])
        return (g_C.float()[:, None] * (onehot.float() - softmax)).to(logits_CV.dtype)

    @staticmethod
    def fused(name, device):
        """ChunkedLogps.<name>, compiled on CUDA (dynamic shapes: a shorter last chunk does not recompile); as is on
        CPU, where full logits are the default and compiling would cost more than it saves."""
        fn = getattr(ChunkedLogps, name)
        if device.type != "cuda":
            return fn
        if name not in ChunkedLogps.compiled:
            ChunkedLogps.compiled[name] = torch.compile(fn, dynamic=True)
        return ChunkedLogps.compiled[name]

    @staticmethod
    def forward(ctx, h_NH, w_VH, labels_N, chunk):
        device = h_NH.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w_VH.dtype
        w, lse = w_VH.to(dtype), ChunkedLogps.fused("lse", h_NH.device)
        lse_N = torch.empty(len(labels_N), device=h_NH.device)
        logps_N = torch.empty(len(labels_N), device=h_NH.device)
        for i in range(0, len(labels_N), chunk):
            logits = h_NH[i:i + chunk].to(dtype) @ w.T
            lse_N[i:i + chunk] = lse(logits)
            picked = logits.gather(-1, labels_N[i:i + chunk, None]).squeeze(-1).float()
            logps_N[i:i + chunk] = picked - lse_N[i:i + chunk]
        ctx.save_for_backward(h_NH, w_VH, labels_N, lse_N)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logps_N

    @staticmethod
    def backward(ctx, grad_N):
        h_NH, w_VH, labels_N, lse_N = ctx.saved_tensors
        V = w_VH.shape[0]
        rows = max(1, ctx.chunk * V // max(len(labels_N), 1))  # vocabulary rows a slice: the forward's logit count
        h, grad_logits = h_NH.to(ctx.dtype), ChunkedLogps.fused("grad_logits", h_NH.device)
        grad_h = torch.zeros(h_NH.shape, device=h_NH.device)  # fp32 accumulator over the slices
        # each slice's rows written once; none where the output embedding is frozen (LoRA): no h·g product for it
        grad_w = torch.empty_like(w_VH) if ctx.needs_input_grad[1] else None
        for v in range(0, V, rows):
            w = w_VH[v:v + rows].to(ctx.dtype)
            g = grad_logits(h @ w.T, lse_N, labels_N - v, grad_N)  # ∂L/∂logits of the slice: one-hot where y_n is
            grad_h += g @ w
            if grad_w is not None:
                grad_w[v:v + rows] = g.T @ h
        return grad_h.to(h_NH.dtype), grad_w, None, None


def label_logps(model, fwd, labels_BT, budget):
    """log πθ(x_{t+1} | x_≤t) at every labelled position, in their order in the batch. budget > 0: from the final
    hidden states and the output embedding through ChunkedLogps (an empty logits_to_keep: the model computes no
    logits), as many positions a chunk as `budget` logits allow (a small
    vocabulary takes a whole batch in one chunk); 0: from the model's full logits, equal up to float rounding
    (for models that post-process them, e.g. soft-capping). Run under autocast. use_cache=False: with a cache,
    transformers ignores position_ids when masking (packed documents would leak).
    labels_BT on the CPU, as the scripts build them: the labelled positions are found there and copied over as
    indices, so the host never waits for the GPU (selecting with a mask on the GPU would wait to learn the count)."""
    device = fwd["input_ids"].device
    labels = labels_BT.cpu()  # a no-op for CPU labels
    row, t = (labels[:, 1:] != IGNORE).nonzero().unbind(-1)  # position t of a row predicts the label at t + 1
    at_N = dist.to_device(row * labels.shape[1] + t, device)  # those positions, in the rows flattened
    labels_N = dist.to_device(labels[row, t + 1], device)
    if not budget:
        return token_logps(model(**fwd, use_cache=False).logits.flatten(0, 1)[at_N], labels_N)
    none = torch.zeros(0, dtype=torch.long, device=device)
    out = model(**fwd, use_cache=False, output_hidden_states=True, logits_to_keep=none)
    h = out.hidden_states[-1].flatten(0, 1)[at_N]  # the last hidden state, after the final norm
    w = model.get_output_embeddings().weight
    return ChunkedLogps.apply(h, w, labels_N, max(1, budget // w.shape[0]))


def seq_logps(logps_N, labels_BT, seq_BT, n_seqs):
    """Log-probs of the labelled positions in batch order (label_logps) -> (Σ_t log π(y_t | x, y_<t) over each
    sequence's response tokens, |y| the count of those tokens), for sequences 0..n_seqs-1. labels_BT and seq_BT
    (the sequence each position belongs to) as common.packing.collate returns them, on the CPU: no wait for the GPU."""
    seq_N = seq_BT[:, 1:][labels_BT[:, 1:] != IGNORE]  # logits at t predict the label at t+1, of the same sequence
    seq_N = dist.to_device(seq_N, logps_N.device)
    sums = torch.zeros(n_seqs, device=logps_N.device).index_add(0, seq_N, logps_N)
    lens = torch.zeros(n_seqs, dtype=torch.long, device=logps_N.device).index_add(0, seq_N, torch.ones_like(seq_N))
    return sums, lens


def logps_entropy(logits_NV, ids_N, temperature=1.0, entropy_grad=False, chunk=4096):
    """log p(id) = z[id] - logsumexp(z) and the entropy H = logsumexp(z) - Σ_v softmax(z)_v z_v of the tempered
    softmax, z = logits / T, in fp32, `chunk` positions at a time; the entropy without gradient unless asked."""
    logps, ents = [], []
    for i in range(0, max(len(ids_N), 1), chunk):
        z = logits_NV[i:i + chunk].float() / temperature
        lse = torch.logsumexp(z, -1)
        logps.append(z.gather(-1, ids_N[i:i + chunk, None]).squeeze(-1) - lse)
        z, lse_h = (z, lse) if entropy_grad else (z.detach(), lse.detach())
        ents.append(lse_h - (z.softmax(-1) * z).sum(-1))
    return torch.cat(logps), torch.cat(ents)


def group_rows(prompts, comp_NC, G, pad_id, share_prompt=True):
    """-> (ids_BL, pos_BL, mask, keep_K: the positions whose logits predict completion tokens).
    share_prompt: one row per prompt, the prompt once and then its G completions; under the 4D mask completion j
    sees the prompt and its own earlier tokens only, positions continue from the prompt: each completion gets its own
    row's logits, the prompt is computed once, not G times (the dense L x L mask costs more than it saves when
    completions are long beside prompts: see sharing_pays)."""
    C, dev, W = comp_NC.shape[1], comp_NC.device, max(map(len, prompts))
    lens_B = torch.tensor([len(p) for p in prompts], device=dev)
    pad_BW = torch.arange(W, device=dev) < W - lens_B[:, None]
    prompt_BW = torch.tensor([[pad_id] * (W - len(p)) + p for p in prompts], device=dev)
    if not share_prompt:  # one left-padded row per completion, a 2D padding mask
        attn_NL = torch.cat([(~pad_BW).long().repeat_interleave(G, 0), torch.ones_like(comp_NC)], 1)
        ids_NL = torch.cat([prompt_BW.repeat_interleave(G, 0), comp_NC], 1)
        pos_NL = (attn_NL.cumsum(-1) - 1).clamp(min=0)
        return ids_NL, pos_NL, attn_NL, torch.arange(W - 1, W + C - 1, device=dev)
    B = len(prompts)
    ids_BL = torch.cat([prompt_BW, comp_NC.reshape(B, G * C)], 1)
    comp_seg_BGC = torch.arange(1, G + 1, device=dev).repeat_interleave(C).expand(B, -1)
    seg_BL = torch.cat([torch.where(pad_BW, -1, 0), comp_seg_BGC], 1)  # -1: padding, 0: prompt, j: completion j
    prompt_pos_BW = (torch.arange(W, device=dev) - (W - lens_B[:, None])).clamp(min=0)
    comp_pos_BGC = lens_B[:, None] + torch.arange(C, device=dev).repeat(G)
    pos_BL = torch.cat([prompt_pos_BW, comp_pos_BGC], 1)
    causal_LL = torch.ones(W + G * C, W + G * C, dtype=torch.bool, device=dev).tril()
    key_seg, query_seg = seg_BL[:, None, :], seg_BL[:, :, None]
    mask_BLL = causal_LL & ((key_seg == 0) | (key_seg == query_seg))  # key in the prompt, or in the query's segment
    keep_K = W + torch.arange(G * C, device=dev) - 1
    keep_K[::C] = W - 1  # token 0 of every completion is predicted by the last prompt token
    return ids_BL, pos_BL, mask_BLL[:, None], keep_K


def sharing_pays(cfg, W, C, G):
    """Whether group_rows' shared-prompt layout should take less compute than a row per completion, by forward FLOPs:
    a token costs 2p through a layer's weights (p: their count) and a (query, key) pair 4d in its attention (d: the
    query width), every pair of a masked row counted (sdpa computes the masked pairs too). Sharing computes each
    prompt (W tokens) once instead of G times, but attends over rows of G completions (C tokens each): it pays where
    prompts are long beside completions. The count is a model of time, not
    a measurement of it (docs/performance.md compares the two), so sharing must save a fifth by it."""
    cfg = cfg.get_text_config()
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    d, d_kv = heads * head_dim, (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    p = 2 * h * d + 2 * h * d_kv + 3 * h * (getattr(cfg, "intermediate_size", None) or 4 * h)  # q o k v, gated MLP
    pair = 4 * d / (2 * p)  # a (query, key) pair's cost, in tokens' costs
    shared, own = W + G * C, W + C
    return shared + pair * shared ** 2 < 0.8 * G * (own + pair * own ** 2)


def completion_logps(model, rows, C, temperature, device):
    """Log-probs and entropies (N, C) of the completion tokens laid out by group_rows, in one forward without cache."""
    ids_BL, pos_BL, mask, keep_K = rows
    with dist.autocast(device):
        out = model(input_ids=ids_BL, attention_mask=mask, position_ids=pos_BL, use_cache=False, logits_to_keep=keep_K)
    logits_NV = out.logits.reshape(-1, out.logits.shape[-1])
    logps, ents = logps_entropy(logits_NV, ids_BL[:, -len(keep_K):].reshape(-1), temperature)
    return logps.view(-1, C), ents.view(-1, C)


def sequence_logps(model, seqs, pad_id, packed, budget, device):
    """Sequences (ids, labels) in one forward -> (Σ_t log π(y_t | x, y_<t) over each sequence's labelled tokens,
    their count |y|). packed: one row of every sequence back to back (varlen attention), else padded rows."""
    fwd, labels, seq = collate(seqs, pad_id, packed, device)
    with dist.autocast(device):
        logps_N = label_logps(model, fwd, labels, budget)
    return seq_logps(logps_N, labels, seq, len(seqs))


@torch.no_grad()
def all_logps(model, items, batch_size, pad_id, packed, budget, device):
    """Of every item (a tuple of k sequences: a pair's chosen and rejected, or one sequence), two (k, n) tensors on
    the device: the summed log-probs of each sequence and its labelled-token count. A forward takes batch_size items,
    their first sequences, then their second ones; split over processes in equal forward counts (FSDP all-gathers in
    each), a rank without items left repeating item 0 and discarding it."""
    rank, world = dist.rank_world()
    k = len(items[0]) if items else 1
    out = torch.zeros(len(items), 2 * k, device=device)
    for i in range(0, len(items), world * batch_size):
        mine = list(range(i + rank * batch_size, min(i + (rank + 1) * batch_size, len(items))))
        batch = [items[j] for j in mine] or items[:1]
        logps, lens = sequence_logps(model, [item[s] for s in range(k) for item in batch], pad_id, packed, budget,
                                     device)
        out[mine] = torch.stack([*logps.chunk(k), *lens.chunk(k)], -1).float()[:len(mine)]
    out_KN = dist.all_sum(out).to(device, torch.float32).T.contiguous()
    return out_KN[:k], out_KN[k:]
