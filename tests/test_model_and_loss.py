import torch

from medml.config import LossConfig, ModelConfig
from medml.losses import build_loss
from medml.models.encoder import build_encoder


def test_encoder_embeds_to_unit_vectors():
    enc = build_encoder(ModelConfig(widen_factor=0.25, embedding_dim=8, head_hidden=16))
    out = enc(torch.randn(3, 1, 16, 16, 16))
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_triplet_semihard_loss_falls_on_a_separable_set():
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(widen_factor=0.25, embedding_dim=8, head_hidden=16))
    bundle = build_loss(LossConfig(miner="all"), n_classes=2, embedding_dim=8)
    loss_fn, miner = bundle.loss, bundle.miner
    # Two classes of tiny volumes: a bright cube in one corner or the other, plus noise.
    x = 0.3 * torch.randn(8, 1, 16, 16, 16)
    y = torch.tensor([0, 1] * 4)
    x[y == 0, :, :8, :8, :8] += 1.0
    x[y == 1, :, 8:, 8:, 8:] += 1.0
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        emb = enc(x)
        loss = loss_fn(emb, y, miner(emb, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
