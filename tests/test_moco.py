"""MoCo v2 pieces, single process: momentum update, queue fill/wrap, sharded layout, fp32 loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from photoz_hpc.config import load_config
from photoz_hpc.errors import ConfigError
from photoz_hpc.models.moco import MoCo, build_moco
from photoz_hpc.models.momentum import momentum_at
from photoz_hpc.models.queue import (
    check_queue_size,
    enqueue,
    infonce_replicated,
    infonce_sharded,
    shard_queue,
    unshard_queue,
)
from photoz_hpc.models.resnet import ResNet
from photoz_hpc.train.dist import Comm


def tiny(**kw) -> MoCo:
    torch.manual_seed(0)
    enc = ResNet("resnet18", width=8)
    args = dict(dim=16, queue_size=32, batch_size=8, temperature=0.2)
    args.update(kw)
    return MoCo(enc, enc.feature_dim, **args)


def test_key_encoder_starts_as_copy_and_has_no_grad() -> None:
    m = tiny()
    for pq, pk in zip(m.encoder_q.parameters(), m.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and not pk.requires_grad


def test_momentum_update_is_exact() -> None:
    m = tiny()
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    q = [p.clone() for p in m.encoder_q.parameters()]
    m.momentum_update(0.9)
    for k0, q0, k1 in zip(before_k, q, m.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q0, rtol=0, atol=1e-6)


def test_momentum_schedule() -> None:
    assert momentum_at(0, 100, 0.99, "constant") == momentum_at(99, 100, 0.99, "constant") == 0.99
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(1 - 0.01 * 0.5)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)


def test_queue_fills_and_wraps() -> None:
    queue, ptr = torch.zeros(4, 12), torch.zeros(1, dtype=torch.long)
    for i in range(4):  # 3 batches fill it, the 4th overwrites the oldest
        enqueue(queue, ptr, torch.full((4, 4), float(i + 1)))
    assert int(ptr) == 4
    assert queue[0].tolist() == [4.0] * 4 + [2.0] * 4 + [3.0] * 4


def test_forward_enqueues_this_steps_keys() -> None:
    m = tiny()
    x = torch.randn(8, 5, 12, 12)
    out = m(x, x.flip(-1), momentum=0.99)
    assert out["loss"].dtype == torch.float32 and out["loss"].requires_grad
    assert int(m.queue_ptr) == 8
    k = m.encode_keys(x.flip(-1))  # same key encoder state and batch as inside forward
    torch.testing.assert_close(m.queue[:, :8].t(), k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.queue.norm(dim=0), torch.ones(32), rtol=0, atol=1e-5)


def test_shard_unshard_round_trip_matches_enqueue_order() -> None:
    full = torch.arange(2 * 24, dtype=torch.float32).reshape(2, 24)
    shards = [shard_queue(full, r, 3, 2) for r in range(3)]
    assert all(s.shape == (2, 8) for s in shards)
    assert torch.equal(unshard_queue(shards, 2), full)
    # rank 1's first slots hold the replicated queue's columns 2..3 (its rows of the first global batch)
    assert shards[1][0, :2].tolist() == [2.0, 3.0]


def test_sharded_loss_equals_replicated_on_one_rank() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(8, 30, generator=g), dim=0)
    a, acc_a = infonce_replicated(q, k, queue, 0.2)
    b, acc_b = infonce_sharded(q, k, queue, 0.2, Comm())
    torch.testing.assert_close(a, b)
    assert float(acc_a) == float(acc_b)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    expected = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    torch.testing.assert_close(a, expected)


def test_queue_size_must_divide() -> None:
    with pytest.raises(ConfigError, match=r"divisible by world_size x per-rank batch = 2 x 24 = 48"):
        check_queue_size(1000, 2, 24)
    check_queue_size(960, 2, 24)
    with pytest.raises(ConfigError, match="queue_size"):
        tiny(queue_size=30, batch_size=8)


def test_loss_and_logits_stay_fp32_under_bf16_autocast() -> None:
    m = tiny()
    x = torch.randn(8, 5, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x)
    assert out["loss"].dtype == torch.float32 and m.queue.dtype == torch.float32
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder_q.parameters())


def test_build_moco_from_config_and_bad_modes() -> None:
    cfg = load_config(None, ["model.arch=resnet18", "model.width=4", "moco.queue_size=64", "loader.batch_size=8",
                             "moco.bn_mode=sync"])
    m = build_moco(cfg)
    assert m.queue.shape == (128, 64)
    with pytest.raises(ConfigError, match="queue_mode"):
        load_config(None, ["moco.queue_mode=allgather"])
    with pytest.raises(ConfigError, match="bn_mode"):
        load_config(None, ["moco.bn_mode=group"])
    with pytest.raises(ConfigError, match="batch"):
        m(torch.randn(4, 5, 8, 8), torch.randn(4, 5, 8, 8))
