"""Losses against values computed by hand from their equations."""
import math

import torch

from algos.distill import nll_loss
from algos.rm import bt_loss
from algos.sft import sft_loss
from common.logps import token_logps


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    # -log σ(d) = log(1 + e^-d) for d = 1, 0, -1
    by_hand = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(1))) / 3
    assert abs(bt_loss(rc, rr, 3).item() - by_hand) < 1e-6
    assert abs(bt_loss(rc, rr, 6).item() - by_hand / 2) < 1e-6  # divided by the global pair count given


def test_bradley_terry_edges_and_gradient_direction():
    assert abs(bt_loss(torch.tensor([0.5]), torch.tensor([0.5]), 1).item() - math.log(2)) < 1e-6  # equal rewards
    assert bt_loss(torch.tensor([100.0]), torch.tensor([0.0]), 1).item() < 1e-30  # large margin, right way
    assert abs(bt_loss(torch.tensor([0.0]), torch.tensor([100.0]), 1).item() - 100.0) < 1e-4  # stable the wrong way
    rc, rr = torch.tensor([0.3], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    bt_loss(rc, rr, 1).backward()
    assert rc.grad.item() < 0 < rr.grad.item()  # descent raises the chosen reward and lowers the rejected
    assert abs(rc.grad.item() + torch.sigmoid(torch.tensor(-0.2)).item()) < 1e-6  # dL/dr_w = -σ(r_l - r_w)


def test_seqkd_nll_is_the_sft_loss():
    """distill's seqkd loss is SFT's on the teacher's tokens: the same sum of log-probs over the same denominator."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 11), torch.randint(0, 11, (6,))
    assert torch.allclose(nll_loss(logits, labels, 9), sft_loss(token_logps(logits, labels), 9))
