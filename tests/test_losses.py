import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medml.config import LossConfig
from medml.losses import LOSSES, build_loss
from medml.losses.adacos import AdaCosLoss, dynamic_scale, fixed_scale


def _separable(n_per_class=6, n_classes=3, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:n_classes] * 2
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.6 * torch.randn(len(y), dim, generator=g)
    return x, y


@pytest.mark.parametrize("name", LOSSES.names())
def test_each_loss_backpropagates_and_falls_on_a_separable_set(name):
    torch.manual_seed(0)
    x, y = _separable()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    bundle = build_loss(
        LossConfig(
            name=name,
            margin=0.2 if name == "triplet" else None,
            miner="all" if name == "triplet" else None,
        ),
        3,
        8,
    )
    params = [{"params": net.parameters(), "lr": 1e-2}]
    if bundle.has_parameters:
        params.append({"params": bundle.loss.parameters(), "lr": 1e-2})
    opt = torch.optim.Adam(params)

    def loss_value():
        emb = F.normalize(net(x), dim=1)
        if bundle.miner is not None:
            return bundle.loss(emb, y, bundle.miner(emb, y))
        return bundle.loss(emb, y)

    first = loss_value()
    first.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    for _ in range(60):
        opt.zero_grad()
        loss = loss_value()
        loss.backward()
        opt.step()
    assert float(loss_value().detach()) < 0.7 * float(first.detach()), name


def test_adacos_fixed_scale_is_the_papers():
    assert fixed_scale(5) == pytest.approx(math.sqrt(2) * math.log(4))
    assert fixed_scale(100) == pytest.approx(math.sqrt(2) * math.log(99))
    assert fixed_scale(2) == pytest.approx(math.sqrt(2) * math.log(2))  # clamped, see module doc


def test_adacos_dynamic_scale_matches_a_hand_computation():
    cos = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.6, 0.0], [0.5, 0.4, 0.2], [0.0, 0.1, 0.95]])
    labels = torch.tensor([0, 1, 0, 2])
    s_prev = 2.0
    # B_avg: mean over rows of sum over non-target classes of exp(s_prev * cos)
    b = [
        np.exp(2 * 0.1) + np.exp(2 * -0.2),
        np.exp(2 * 0.3) + np.exp(0.0),
        np.exp(2 * 0.4) + np.exp(2 * 0.2),
        np.exp(0.0) + np.exp(2 * 0.1),
    ]
    b_avg = np.mean(b)
    # target angles: acos(0.9), acos(0.6), acos(0.5), acos(0.95); torch's median of 4 is the
    # lower middle value: sorted angles [acos .95, acos .9, acos .6, acos .5] -> acos(0.9)
    theta_med = math.acos(0.9)
    expected = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    assert dynamic_scale(cos, labels, s_prev) == pytest.approx(expected, rel=1e-5)
    # a large median angle is clamped at pi/4
    wide = torch.tensor([[0.0, 0.5], [0.1, 0.2]])
    b2 = np.mean([np.exp(2 * 0.5), np.exp(2 * 0.1)])
    assert dynamic_scale(wide, torch.tensor([0, 1]), 2.0) == pytest.approx(
        math.log(b2) / math.cos(math.pi / 4), rel=1e-5
    )


def test_adacos_updates_its_scale_only_when_dynamic_and_training():
    emb = F.normalize(torch.randn(8, 4), dim=1)
    y = torch.tensor([0, 1, 2, 3] * 2)
    dyn, fixed = AdaCosLoss(4, 4, dynamic=True), AdaCosLoss(4, 4, dynamic=False)
    s0 = float(dyn.s)
    with torch.no_grad():
        expected = dynamic_scale(dyn.cosines(emb), y, s0)
    dyn(emb, y)
    fixed(emb, y)
    assert float(dyn.s) == pytest.approx(expected, rel=1e-5) and float(dyn.s) != s0
    assert float(fixed.s) == pytest.approx(fixed_scale(4))
    dyn.eval()
    s1 = float(dyn.s)
    dyn(emb, y)
    assert float(dyn.s) == s1
    # the loss itself is cross-entropy over s * cos, no margin
    logits = fixed.s * fixed.cosines(emb)
    expected_ce = float(F.cross_entropy(logits, y).detach())
    assert float(fixed(emb, y).detach()) == pytest.approx(expected_ce, rel=1e-6)


def test_adacos_trains_a_binary_task_where_the_papers_scale_collapses():
    """Two classes: the paper's dynamic scale shrinks to 0 and the loss stalls at ln 2."""
    torch.manual_seed(0)
    x, y = _separable(n_per_class=12, n_classes=2)
    net = torch.nn.Linear(6, 8)
    loss_fn = AdaCosLoss(2, 8)
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=1e-2)
    first = float(loss_fn(F.normalize(net(x), dim=1), y).detach())
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(F.normalize(net(x), dim=1), y)
        loss.backward()
        opt.step()
    assert float(loss_fn.s) >= fixed_scale(2) - 1e-6
    assert float(loss.detach()) < 0.8 * first


def test_triplet_miners_and_margin_defaults():
    from pytorch_metric_learning import miners

    assert isinstance(build_loss(LossConfig(miner="batch-hard"), 3, 8).miner, miners.BatchHardMiner)
    semi = build_loss(LossConfig(), 3, 8).miner
    assert semi.type_of_triplets == "semihard"
    arc = build_loss(LossConfig(name="arcface"), 3, 8).loss
    assert arc.margin == pytest.approx(math.radians(28.6))  # PML takes degrees


def test_softmax_label_smoothing_matches_a_hand_computation_and_is_refused_out_of_range():
    # loss.options reaches the softmax baseline: with smoothing eps over C classes the target
    # is (1 - eps) one-hot + eps / C, so the loss is -(sum target * log_softmax).
    torch.manual_seed(0)
    emb, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    plain = build_loss(LossConfig(name="softmax"), 3, 4).loss
    smooth = build_loss(LossConfig(name="softmax", options={"label_smoothing": 0.2}), 3, 4).loss
    smooth.classifier.load_state_dict(plain.classifier.state_dict())
    logp = F.log_softmax(plain.classifier(emb), dim=1)
    target = 0.8 * F.one_hot(y, 3).float() + 0.2 / 3
    expected = -(target * logp).sum(1).mean()
    assert torch.allclose(smooth(emb, y), expected, atol=1e-6)
    assert not torch.allclose(plain(emb, y), expected, atol=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss(LossConfig(name="softmax", options={"label_smoothing": 1.0}), 3, 4)
