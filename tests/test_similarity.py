"""Embeddings, similarity search and anomalies with known answers: rotated / mirrored copies are found as
their originals' nearest neighbours, faiss and torch agree, injected artefacts rank among the top anomalies,
2 ranks embed every galaxy exactly once, and bad inputs fail clearly.

The encoder is a random-init MoCo whose 3x3 kernels are averaged over the 8 rotations/reflections of the
square: every layer is then equivariant to those, the global pool invariant, and on odd image sizes (33 ->
17 -> 9 -> 5, stride-2 grids map onto themselves) the whole network gives a rotated or mirrored cutout
exactly the embedding of the original. So the nearest neighbour of a copy is known, deterministically,
without training. The normal galaxies have smooth colours (a redshift-like SED), the artefacts do not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, run_torch, write_release_h5

from photoz_hpc.cli import main
from photoz_hpc.config import Config, load_config
from photoz_hpc.data.prepare import prepare
from photoz_hpc.errors import DatasetError, PhotozError
from photoz_hpc.evaluate.embeddings import INDEX_NAME, Embeddings, embed_dataset, load_embedder
from photoz_hpc.evaluate.similarity import anomaly_scores, faiss_available, knn
from photoz_hpc.models.moco import build_moco
from photoz_hpc.survey import load_survey
from photoz_hpc.train.checkpoint import export_checkpoint_encoder, save_checkpoint

N_GAL, N_COPY, SIZE = 40, 8, 33
COPIES = np.arange(N_GAL, N_GAL + N_COPY)  # copy of galaxy i (i < N_COPY) at N_GAL + i
STREAK, DEAD = N_GAL + N_COPY, N_GAL + N_COPY + 1
EMBED_OV = [f"augment.crop_size={SIZE}", "loader.backend=reference", "train.precision=fp32", "dist.backend=none"]


def galaxies(n: int, seed: int) -> np.ndarray:
    """Elliptical blobs of varied size, shape and brightness; colours from one smooth SED family."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    sigma, q, ang = rng.uniform(2, 5, (n, 1, 1)), rng.uniform(0.4, 1, (n, 1, 1)), rng.uniform(0, np.pi, (n, 1, 1))
    u, v = xx * np.cos(ang) + yy * np.sin(ang), -xx * np.sin(ang) + yy * np.cos(ang)
    profile = np.exp(-0.5 * (u**2 + (v / q) ** 2) / sigma**2)
    z = rng.uniform(0.02, 0.38, n)
    colours = rng.lognormal(0.0, 0.3, (n, 1)) * np.exp(-np.outer(z, np.arange(5)) * 3.0)
    return (colours[:, :, None, None] * profile[:, None] + rng.normal(0, 0.02, (n, 5, SIZE, SIZE))).astype(np.float32)


def make_set(root: Path, seed: int = 3) -> Path:
    """N_GAL galaxies, then rotated (90 deg) and mirrored copies of the first N_COPY, then a galaxy with a
    bright streak and one with a dead band (a stripe of zero pixels through its centre)."""
    img = galaxies(N_GAL, seed)
    half = N_COPY // 2
    copies = np.concatenate([np.rot90(img[:half], 1, axes=(2, 3)), img[half:N_COPY, :, :, ::-1]])
    streak = img[N_COPY + 1].copy()
    streak[:, SIZE // 2 - 1:SIZE // 2 + 1, :] += 3 * streak.max()
    dead = img[N_COPY + 2].copy()
    dead[:, :, SIZE // 2 - 3:SIZE // 2 + 3] = 0.0
    images = np.ascontiguousarray(np.concatenate([img, copies, streak[None], dead[None]]), dtype=np.float32)
    r_dr12 = np.asarray(load_survey("sdss").input_coefficients)  # the release's per-band extinction coefficients
    e_bv = np.tile((r_dr12 * 0.02).astype(np.float32), (len(images), 1))  # the same for all: copies stay copies
    root.mkdir(parents=True, exist_ok=True)
    h5 = write_release_h5(root / "release.h5", len(images), seed=seed, size=SIZE, images=images, e_bv=e_bv)
    return prepare([h5], root / "prepared", samples_per_shard=20, overwrite=True)


def symmetric_checkpoint(root: Path) -> Path:
    cfg = load_config(None, [*TINY_MODEL, "model.embed_dim=32", "moco.queue_size=64",
                             "loader.batch_size=16", "moco.bn_splits=1", "seed=11"], root=Config)
    torch.manual_seed(0)
    moco = build_moco(cfg)
    with torch.no_grad():
        for m in moco.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
                turns = [torch.rot90(m.weight, k, (2, 3)) for k in range(4)]
                m.weight.copy_(torch.stack(turns + [t.flip(3) for t in turns]).mean(0))
    return save_checkpoint(root / "checkpoints", 1, {"task": "pretrain", "model": moco.state_dict(),
                                                     "config": dataclasses.asdict(cfg)})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("similarity")
    data = make_set(root)
    ckpt = symmetric_checkpoint(root)
    for feature in ("projection", "trunk"):
        embed_dataset(ckpt, data, root / f"emb_{feature}", feature, EMBED_OV)
    return {"root": root, "data": data, "ckpt": ckpt, "emb": {f: root / f"emb_{f}" for f in ("projection", "trunk")}}


def _backends() -> list[str]:
    return ["torch", "faiss"] if faiss_available() else ["torch"]


@pytest.mark.parametrize("feature", ["projection", "trunk"])
def test_nearest_neighbour_of_a_rotated_or_mirrored_copy_is_its_original(world, feature):
    emb = Embeddings(world["emb"][feature])
    assert emb.dim == (32 if feature == "projection" else 64)
    vec = emb.vectors()
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    originals = np.arange(N_COPY)
    queries = np.r_[originals, COPIES]
    for backend in _backends():
        sims, rows = knn(emb, vec[queries], 3, query_rows=queries, backend=backend)
        np.testing.assert_array_equal(rows[:, 0], np.r_[COPIES, originals], err_msg=backend)
        # the copy: the same embedding up to rounding; the runner-up strictly below (random features share a
        # common direction, so every similarity is high: the margin is ~1e-5, far above float32 rounding)
        assert (np.abs(sims[:, 0] - 1) < 1e-6).all() and (sims[:, 0] - sims[:, 1] > 5e-6).all(), backend
        assert not (rows == queries[:, None]).any()  # a galaxy is never its own neighbour


def test_faiss_and_torch_find_the_same_neighbours(world):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(3000, 24)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    q = np.arange(0, 3000, 7)
    (s_t, r_t), (s_f, r_f) = (knn(vec, vec[q], 10, query_rows=q, backend=b) for b in ("torch", "faiss"))
    np.testing.assert_array_equal(r_t, r_f)
    np.testing.assert_allclose(s_t, s_f, atol=1e-5)
    emb = Embeddings(world["emb"]["projection"])
    np.testing.assert_allclose(anomaly_scores(emb, 5, "torch"), anomaly_scores(emb, 5, "faiss"), atol=1e-5)


def test_injected_artefacts_rank_among_the_top_anomalies(world, capsys):
    out = world["root"] / "anomalies"
    assert main(["anomalies", str(world["emb"]["trunk"]), "--top", "5", "--k", "5", "--out", str(out),
                 "--backend", "torch", "--crop", "33"]) == 0
    result = json.loads(capsys.readouterr().out)
    top = [t["index"] for t in result["top"]]
    assert STREAK in top and DEAD in top, top
    assert (out / "anomalies.png").stat().st_size > 1000
    scores = np.loadtxt(out / "anomaly_scores.csv", delimiter=",", skiprows=1, usecols=(0, 2, 3))
    assert len(scores) == N_GAL + N_COPY + 2 and sorted(scores[:, 2]) == list(range(1, len(scores) + 1))


def test_search_command_by_id_and_objid_writes_table_and_figure(world, capsys):
    emb = Embeddings(world["emb"]["projection"])
    out = world["root"] / "search"
    objid = int(emb.ids["ObjID"][N_COPY - 1])
    assert main(["search", str(world["emb"]["projection"]), "--query", str(objid), "--objid", "--k", "4",
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"][0]["query"] == N_COPY - 1
    assert result["queries"][0]["neighbours"][0]["index"] == COPIES[-1]
    assert (out / "search.png").stat().st_size > 1000
    lines = (out / "search.csv").read_text().splitlines()
    assert lines[0].startswith("query,query_ObjID,rank,index") and len(lines) == 1 + 4
    assert main(["search", str(world["emb"]["projection"]), "--query", "0", "999", "--k", "2"]) == 1
    assert "999" in capsys.readouterr().err
    # an ObjID given without --objid: the error says so
    assert main(["search", str(world["emb"]["projection"]), "--query", str(objid), "--k", "2"]) == 1
    assert "SDSS ObjIDs of this set: pass --objid" in capsys.readouterr().err


def test_embeddings_of_another_dataset_are_refused(world, tmp_path, capsys):
    other = make_set(tmp_path / "other", seed=4)
    emb = Embeddings(world["emb"]["projection"])
    with pytest.raises(DatasetError, match="computed from dataset .* embed that dataset first"):
        emb.dataset(other)
    assert main(["search", str(world["emb"]["projection"]), "--data", str(other), "--query", "0"]) == 1
    assert "not from" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="not an embedding directory"):
        Embeddings(tmp_path)
    with pytest.raises(PhotozError, match="k = 60 neighbours"):
        knn(emb, emb.rows([0]), 60, query_rows=np.array([0]))


def test_encoder_export_keeps_the_projection_head(world, tmp_path):
    enc = export_checkpoint_encoder(world["ckpt"], tmp_path / "encoder.pt")
    embed_dataset(enc, world["data"], tmp_path / "from_export", "projection", EMBED_OV)
    np.testing.assert_allclose(Embeddings(tmp_path / "from_export").vectors(),
                               Embeddings(world["emb"]["projection"]).vectors(), atol=1e-6)
    blob = torch.load(enc, weights_only=True)
    del blob["projection_head"]  # what an export written before heads were kept looks like
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(PhotozError, match="no projection head.*--feature trunk"):
        load_embedder(tmp_path / "old.pt", "projection")
    assert load_embedder(tmp_path / "old.pt", "trunk")[0].dim == 64


def test_embed_uses_the_crop_size_the_encoder_was_trained_with(world, tmp_path, capsys):
    cfg = load_config(None, [*TINY_MODEL, "model.embed_dim=32", "moco.queue_size=64", "loader.batch_size=16",
                             "augment.crop_size=24"], root=Config)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, {"task": "pretrain", "model": build_moco(cfg).state_dict(),
                                                         "config": dataclasses.asdict(cfg)})
    enc = tmp_path / "encoder.pt"
    assert main(["export-encoder", str(ckpt), str(enc)]) == 0
    assert torch.load(enc, weights_only=True)["augment"]["crop_size"] == 24
    base = ["embed", "--checkpoint", str(enc), "--data", str(world["data"])]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "e24"), "loader.backend=reference", "dist.backend=none"]) == 0
    assert json.loads((tmp_path / "e24" / INDEX_NAME).read_text())["crop_size"] == 24  # not the default 64
    assert "augment." not in capsys.readouterr().err
    # an explicitly different crop: used, with a warning naming both
    assert main([*base, "--out", str(tmp_path / "e33"), "augment.crop_size=33", "loader.backend=reference",
                     "dist.backend=none"]) == 0
    assert json.loads((tmp_path / "e33" / INDEX_NAME).read_text())["crop_size"] == 33
    err = capsys.readouterr().err
    assert "was trained with augment.crop_size=24; embedding with augment.crop_size=33" in err
    # an old export without view settings: the defaults (or the override), with a warning
    blob = torch.load(enc, weights_only=True)
    del blob["augment"]
    torch.save(blob, tmp_path / "old.pt")
    assert main(["embed", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(world["data"]), "--out",
                     str(tmp_path / "old"), "augment.crop_size=24", "loader.backend=reference",
                     "dist.backend=none"]) == 0
    err = capsys.readouterr().err
    assert "carries no view settings" in err and "augment.crop_size=24" in err and "export-encoder" in err


def test_two_ranks_embed_every_galaxy_exactly_once(world, tmp_path):
    out = tmp_path / "dist"
    args = ["--repeat", "2", "--out", str(out), "--checkpoint", str(world["ckpt"]), "--data", str(world["data"]),
            *EMBED_OV[:-1], "dist.backend=torch", "loader.batch_size=16"]
    for rc, log in run_torch("embed_run.py", args, world=2, timeout=120):
        assert rc == 0, log[-3000:]
    ref = Embeddings(world["emb"]["projection"]).vectors()
    for run in ("run0", "run1"):
        emb = Embeddings(out / run)
        index = json.loads((out / run / "index.json").read_text())
        assert index["world_size"] == 2 and [p["count"] for p in index["parts"]] == [25, 25]
        np.testing.assert_array_equal(emb.ids["index"], np.arange(N_GAL + N_COPY + 2))
        np.testing.assert_allclose(emb.vectors(), ref, atol=1e-5)
