"""Our losses against Hugging Face TRL's on the same tensors, where TRL has the same option (a check, not a test:
TRL is no dependency of the project). `./run.sh bench` runs it in its TRL environment; or, with TRL importable,
`python tests/trl_match.py`. TRL's trainers are called unbound, on a stand-in for the trainer that carries only
the settings their loss reads, so the comparison is of TRL's own loss code, not of a copy of it.

    grpo token / sequence (GSPO) / cispo / --tis_cap  vs  GRPOTrainer._compute_loss
    dpo --rpo_alpha                                    vs  DPOTrainer._compute_loss, loss_type ["sigmoid", "sft"]
    distill --mode gkd                                 vs  GKDTrainer.generalized_jsd_loss
"""
import os
import sys
from collections import defaultdict
from types import SimpleNamespace as NS

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from algos import distill, dpo, grpo  # noqa: E402


class Accelerator:  # one process: every collective is the identity
    num_processes, device, sync_gradients = 1, torch.device("cpu"), True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_grpo(logps, old, sampler, adv, mask, level, loss_type, eps, eps_high, beta, ref, tis_cap):
    from trl.trainer.grpo_trainer import GRPOTrainer
    me = NS(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
            loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=tis_cap > 0,
            vllm_importance_sampling_correction=tis_cap > 0, model=NS(training=True), aux_loss_enabled=False,
            current_gradient_accumulation_steps=1, accelerator=Accelerator(), _entropy_bonus_enabled=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            args=NS(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
            _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.ones_like(logps), None))
    B, T = logps.shape
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask.long(), advantages=adv,
                  old_per_token_logps=old, num_items_in_batch=mask.sum(), ref_per_token_logps=ref)
    if tis_cap:  # TRL's token_truncate mode: min(exp(old - sampler), C), computed when sampling
        inputs["importance_sampling_ratio"] = torch.exp((old - sampler) * mask).clamp(max=tis_cap)
    return GRPOTrainer._compute_loss(me, None, inputs)


def ours_grpo(logps, old, sampler, adv, mask, level, loss_type, eps, eps_high, beta, ref, tis_cap, loss_agg):
    ratio = grpo.importance_ratio(logps, old, mask, level)
    if loss_type == "clip":
        loss = grpo.clipped_surrogate(ratio, adv, eps, eps_high)[0]
    else:
        loss = grpo.cispo_loss(ratio, logps, adv, eps_high)[0]
    if tis_cap:
        loss = loss * torch.exp(old - sampler).clamp(max=tis_cap)
    loss = loss + beta * grpo.kl_estimate(logps, ref, "k3")
    n = mask.sum() if loss_agg == "token" else (mask.sum(-1) > 0).sum()
    return grpo.aggregate(loss, mask, loss_agg, n.item())


def same(name, ours, theirs, leaf):
    g_ours, = torch.autograd.grad(ours, leaf)
    g_theirs, = torch.autograd.grad(theirs, leaf)
    loss_diff, grad_diff = (ours - theirs).abs().item(), (g_ours - g_theirs).abs().max().item()
    print(f"{name:<64} loss {ours.item():+.6f}, TRL {theirs.item():+.6f}: |Δ| {loss_diff:.1e}, "
          f"max |Δgrad| {grad_diff:.1e}")
    return loss_diff < 1e-6 and grad_diff < 1e-6


def main():
    torch.manual_seed(0)
    B, T = 6, 5
    mask = torch.ones(B, T)
    mask[1, 3:] = mask[4, 2:] = 0  # two shorter completions
    old = -torch.rand(B, T) * 3
    logps = (old + 0.3 * torch.randn(B, T)).requires_grad_()  # off-policy: ratios away from 1, some clipped
    sampler, ref = old + 0.1 * torch.randn(B, T), old + 0.2 * torch.randn(B, T)
    adv = torch.randn(B)
    ok = []
    cases = [  # name, our settings, TRL's
        ("grpo token ratios, token mean (TRL dapo)", ("token", "clip", 0.2, 0.28, "token"), ("token", "dapo", 0.28)),
        ("GSPO: sequence ratios, sequence mean (TRL grpo)", ("sequence", "clip", 0.2, 0.28, "sequence"),
         ("sequence", "grpo", 0.28)),
        ("GSPO: sequence ratios, token mean (TRL dapo)", ("sequence", "clip", 0.2, 0.2, "token"),
         ("sequence", "dapo", 0.2)),
        ("CISPO, ε_high 0.28 (TRL epsilon_high 1.28)", ("token", "cispo", 0.2, 0.28, "token"),
         ("token", "cispo", 1.28)),
    ]
    for beta in (0.0, 0.04):
        for tis_cap in (0.0, 1.05):
            for name, (level, loss_type, eps, eps_high, agg), (t_level, t_type, t_high) in cases:
                ours = ours_grpo(logps, old, sampler, adv, mask, level, loss_type, eps, eps_high, beta, ref, tis_cap,
                                 agg)
                theirs = trl_grpo(logps, old, sampler, adv[:, None], mask, t_level, t_type, eps, t_high, beta, ref,
                                  tis_cap)
                ok.append(same(f"{name}, β {beta}, C {tis_cap}", ours, theirs, logps))

    # dpo --rpo_alpha: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, α], one micro-batch
    from trl.trainer.dpo_trainer import DPOTrainer
    P, L = 4, 6
    tok_logps = (-torch.rand(2 * P, L) * 2).requires_grad_()  # chosen rows, then rejected rows
    comp_mask = torch.ones(2 * P, L + 1, dtype=torch.long)
    comp_mask[:, 0] = 0  # the first position is prompt
    comp_mask[1, 5:] = comp_mask[6, 4:] = 0
    ref_c, ref_r = -torch.rand(P) * 8, -torch.rand(P) * 8
    alpha, beta = 0.7, 0.1

    def model(**kwargs):
        return NS(log_probs=tok_logps * comp_mask[:, 1:], logits=torch.zeros(2 * P, L, 3),
                  is_top1=torch.zeros(2 * P, L, dtype=torch.bool), entropy=torch.zeros(2 * P, L),
                  mean_logits=torch.zeros(2 * P, L))
    me = NS(model=NS(training=True), accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", beta=beta, loss_types=["sigmoid", "sft"],
            loss_weights=[1.0, alpha], label_smoothing=0.0, use_weighting=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            args=NS(rpo_alpha=None, use_weighting=False), _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros(2 * P, L + 1, dtype=torch.long), attention_mask=torch.ones(2 * P, L + 1),
                  completion_mask=comp_mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    theirs = DPOTrainer._compute_loss(me, model, inputs, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    seq = (tok_logps * comp_mask[:, 1:]).sum(-1)
    n_chosen = comp_mask[:P, 1:].sum().item()
    ours = dpo.dpo_loss(seq[:P], seq[P:], ref_c, ref_r, beta, P, rpo_alpha=alpha, n_chosen_tokens=n_chosen)[0]
    ok.append(same(f"dpo --rpo_alpha {alpha} (TRL sigmoid + {alpha}·sft)", ours, theirs, tok_logps))

    # distill --mode gkd: TRL's generalized_jsd_loss, batchmean over the labelled positions, τ = 1
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    s_logits, t_logits = torch.randn(3, 4, 7).requires_grad_(), torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    labels[0, :2] = labels[2, 3] = -100
    keep = labels != -100
    for jsd_beta in (0.0, 0.3, 0.5, 1.0):
        theirs = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=jsd_beta)
        ours = distill.gkd_loss(s_logits[keep], t_logits[keep], keep.sum().item(), jsd_beta)
        ok.append(same(f"distill gkd, jsd_beta {jsd_beta}", ours, theirs, s_logits))
    print(f"{sum(ok)} of {len(ok)} agree")
    return all(ok)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
