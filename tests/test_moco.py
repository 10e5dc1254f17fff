"""MoCo v2 pieces, single process: momentum update, queue fill/wrap, sharded layout, fp32 loss, split BN,
and what node-local shuffle-BN needs that one process can check (config, errors, the node layout)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from photoz_hpc.comm.base import Comm
from photoz_hpc.comm.nodes import LOCAL_SIZE_VARS, env_local_size, node_groups
from photoz_hpc.config import load_config
from photoz_hpc.errors import ConfigError, PhotozError
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
from photoz_hpc.models.resnet import ResNet, SplitBatchNorm2d, build_encoder


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


def test_loss_and_logits_stay_fp32_under_bf16_autocast(monkeypatch) -> None:
    import photoz_hpc.models.moco as moco_module

    seen = {}
    real = moco_module.infonce_replicated

    def spy(q, k, queue, temperature):  # the logits are q @ queue, computed in this context
        seen.update(q=q.dtype, k=k.dtype, logits=(q @ queue).dtype, autocast=torch.is_autocast_enabled("cpu"))
        return real(q, k, queue, temperature)

    monkeypatch.setattr(moco_module, "infonce_replicated", spy)
    m = tiny()
    x = torch.randn(8, 5, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.encoder_q(x).dtype == torch.bfloat16  # autocast does reach the encoders
        out = m(x, x)
    assert seen == {"q": torch.float32, "k": torch.float32, "logits": torch.float32, "autocast": False}
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
    # bad modes that get past the config (set after validation, or MoCo built directly) reach MoCo's own check
    enc = ResNet("resnet18", width=4)
    for kw, match in ((dict(queue_mode="allgather"), "queue_mode 'allgather'"), (dict(bn_mode="group"), "bn_mode 'group'")):
        with pytest.raises(ConfigError, match=match):
            MoCo(enc, enc.feature_dim, dim=16, queue_size=32, batch_size=8, **kw)
    for key, value in (("queue_mode", "allgather"), ("bn_mode", "group")):
        bad = load_config(None, ["model.arch=resnet18", "model.width=4", "moco.queue_size=64", "loader.batch_size=8"])
        setattr(bad.moco, key, value)
        with pytest.raises(ConfigError, match=f"moco.{key} '{value}'"):
            build_moco(bad)


# ---------------------------------------------------------------- single-process shuffle-BN (split BN)


def test_split_bn_statistics_are_per_sub_batch() -> None:
    torch.manual_seed(1)
    bn = SplitBatchNorm2d(3, num_splits=4, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    y = bn(x)
    mean_acc, var_acc = torch.zeros(3), torch.zeros(3)
    for s in range(4):  # sub-batch s = rows s, s + 4 (the reference's strided split)
        xs = x[s::4]
        mu, var = xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=False)
        ref = (xs - mu[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        torch.testing.assert_close(y[s::4], ref, rtol=1e-5, atol=1e-5)
        mean_acc += 0.1 * mu / 4
        var_acc += 0.1 * xs.var((0, 2, 3), unbiased=True) / 4
    torch.testing.assert_close(bn.running_mean, mean_acc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + var_acc, rtol=1e-5, atol=1e-6)
    # a plain full-batch BN gives different outputs (the splits matter) ...
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    assert not torch.allclose(plain.train()(x), y, atol=1e-3)
    # ... and in eval mode it is exactly nn.BatchNorm2d with the running statistics
    bn.eval()
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), plain.eval()(x), rtol=0, atol=0)


def test_split_bn_gradients_match_per_sub_batch_bn() -> None:
    torch.manual_seed(2)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    bn = SplitBatchNorm2d(4, num_splits=3)
    bn(x).pow(2).mul(torch.arange(6.0)[:, None, None, None]).sum().backward()
    gx, gw = x.grad.clone(), bn.weight.grad.clone()
    x.grad = None
    ref = torch.nn.BatchNorm2d(4)
    out = torch.stack([ref(x[i::3]) for i in range(3)], 1).reshape(6, 4, 3, 3)  # row a*3 + s
    out.pow(2).mul(torch.arange(6.0)[:, None, None, None]).sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.weight.grad, gw, rtol=1e-5, atol=1e-6)


def test_single_process_shuffle_uses_split_bn_and_keeps_state_dict_keys() -> None:
    plain = tiny(bn_mode="none")
    split = tiny(bn_mode="shuffle", bn_splits=4)
    assert not any(isinstance(mod, SplitBatchNorm2d) for mod in plain.modules())
    for enc in (split.encoder_q, split.encoder_k):
        bns = [mod for mod in enc.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        assert bns and all(isinstance(mod, SplitBatchNorm2d) and mod.num_splits == 4 for mod in bns)
    assert list(split.state_dict()) == list(plain.state_dict())
    for a, b in zip(split.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the optimiser still sees the same parameters, and export loads into a plain ResNet
    assert len(list(split.encoder_q.parameters())) == len(list(plain.encoder_q.parameters()))
    enc = ResNet("resnet18", width=8)
    enc.load_state_dict(split.encoder.state_dict())
    x = torch.randn(4, 5, 12, 12)
    torch.testing.assert_close(enc.eval()(x), split.encoder.eval()(x), rtol=0, atol=0)
    # bn_splits=1 switches the split off
    assert not any(isinstance(mod, SplitBatchNorm2d) for mod in tiny(bn_splits=1).modules())


def test_single_process_key_shuffle_is_exact() -> None:
    """Keys from encode_keys equal an unshuffled computation with the same split assignment: output
    row i is input row i's key, normalised with the statistics of the sub-batch that row was shuffled into."""
    m = tiny(bn_mode="shuffle", bn_splits=4)
    x = torch.randn(8, 5, 12, 12)
    seed = 1234
    k = m.encode_keys(x, shuffle_seed=seed)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(perm, torch.arange(8))
    # shuffled position j sits in sub-batch j % 4; compute each sub-batch on its own with plain BN
    plain = copy.deepcopy(tiny(bn_mode="none").encoder_k)
    plain.load_state_dict(m.encoder_k.state_dict())
    expected = torch.empty_like(k)
    for s in range(4):
        rows = perm[s::4]  # original rows in sub-batch s
        expected[rows] = F.normalize(plain(x[rows]).float(), dim=1)
    torch.testing.assert_close(k, expected, rtol=1e-4, atol=1e-5)
    # the shuffle matters (a different seed groups rows differently) and is reproducible (resume)
    assert not torch.allclose(m.encode_keys(x, shuffle_seed=seed + 1), k, atol=1e-4)
    torch.testing.assert_close(m.encode_keys(x, shuffle_seed=seed), k, rtol=0, atol=0)
    # with fixed (eval) statistics the shuffle is invisible: row i is exactly row i's key
    m.encoder_k.eval()
    plain.load_state_dict(m.encoder_k.state_dict())  # the training-mode calls above moved the running stats
    plain.eval()
    torch.testing.assert_close(m.encode_keys(x, shuffle_seed=seed), F.normalize(plain(x).float(), dim=1),
                               rtol=1e-5, atol=1e-6)


def test_bad_bn_splits_rejected() -> None:
    with pytest.raises(ConfigError, match=r"moco\.bn_splits = 5 must divide the per-rank batch loader\.batch_size = 8"):
        tiny(bn_splits=5)
    base = ["model.arch=resnet18", "model.width=4", "moco.queue_size=96", "loader.batch_size=12"]
    with pytest.raises(ConfigError, match=r"moco\.bn_splits.*valid values: \[1, 2, 3, 4, 6, 12\]"):
        build_moco(load_config(None, base))  # default 8 does not divide 12
    assert build_moco(load_config(None, [*base, "moco.bn_splits=4"])).bn_splits == 4
    assert build_moco(load_config(None, [*base, "moco.bn_mode=none"])).bn_splits == 1  # unused: not checked
    with pytest.raises(ConfigError, match="moco.bn_splits"):
        load_config(None, ["moco.bn_splits=0"])


def test_split_bn_training_step_has_finite_gradients_and_enqueues() -> None:
    cfg = load_config(None, ["model.arch=resnet18", "model.width=4", "moco.queue_size=32", "loader.batch_size=8",
                             "moco.bn_splits=2"])
    m = build_moco(cfg)
    assert isinstance(build_encoder(cfg.model), ResNet) and m.bn_splits == 2
    x = torch.randn(8, 5, 12, 12)
    out = m(x, x.flip(-1), shuffle_seed=3)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder_q.parameters())
    assert int(m.queue_ptr) == 8


# ---------------------------------------------------------------- node-local shuffle-BN (moco.bn_mode=shuffle-node)


def test_shuffle_node_config_alias_and_bad_modes() -> None:
    assert load_config(None, ["moco.bn_mode=shuffle-node"]).moco.bn_mode == "shuffle-node"
    assert load_config(None, ["moco.bn_mode=shuffle_node"]).moco.bn_mode == "shuffle-node"  # alias, normalised
    with pytest.raises(ConfigError, match=r"moco\.bn_mode' = 'node' is not one of .*'shuffle-node'"):
        load_config(None, ["moco.bn_mode=node"])


def test_shuffle_node_on_one_process_is_single_process_shuffle() -> None:
    """A one-rank node has nobody to shuffle with: split BN and the seeded local permutation, as 'shuffle'."""
    node, glob = tiny(bn_mode="shuffle-node", bn_splits=4), tiny(bn_mode="shuffle", bn_splits=4)
    assert node.bn_splits == glob.bn_splits == 4
    x = torch.randn(8, 5, 12, 12)
    torch.testing.assert_close(node.encode_keys(x, shuffle_seed=3), glob.encode_keys(x, shuffle_seed=3), rtol=0, atol=0)


def test_shuffle_node_without_node_groups_names_the_key_and_backend() -> None:
    comm = Comm()
    comm.node_error = "local ranks by rank: [0, 0, 1, 1]"
    with pytest.raises(ConfigError, match=r"moco\.bn_mode 'shuffle-node' with dist\.backend 'none': local ranks"):
        tiny(bn_mode="shuffle-node", comm=comm)
    with pytest.raises(PhotozError, match="no node-local collectives with dist.backend 'none'"):
        comm.allgather_node(torch.zeros(2))
    assert tiny(bn_mode="shuffle", comm=comm).bn_mode == "shuffle"  # other modes do not need node groups


def test_node_groups_are_consecutive_blocks_of_one_size() -> None:
    assert node_groups([0, 1, 0, 1]) == [[0, 1], [2, 3]]
    assert node_groups([0, 0]) == [[0], [1]] and node_groups([0, 1]) == [[0, 1]]
    for bad in ([0, 0, 1, 1], [0, 1, 0], [1, 0]):  # cyclic placement, unequal nodes, no local rank 0 first
        with pytest.raises(PhotozError, match=r"consecutive and equally many; local ranks by rank"):
            node_groups(bad)


def test_horovod_process_sets_come_from_the_launchers_ranks_per_node(monkeypatch) -> None:
    """Horovod takes its process sets at hvd.init: one per node when the launcher states the ranks per node
    and there are several nodes of several ranks; none otherwise (the global set or no traffic suffices)."""
    from types import SimpleNamespace

    from photoz_hpc.comm.horovod_comm import node_process_sets

    hvd = SimpleNamespace(ProcessSet=list)
    for key in (*LOCAL_SIZE_VARS, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert env_local_size() is None and node_process_sets(hvd, 8) == []
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2)")
    assert env_local_size() == 4 and node_process_sets(hvd, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")
    assert node_process_sets(hvd, 4) == [[0, 1], [2, 3]] and node_process_sets(hvd, 2) == []
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "1")
    assert node_process_sets(hvd, 4) == []
