"""Galaxies keep their ids through every output: Multimodal Universe stores name them by ``object_id`` (int64, or
strings such as Legacy DR10's 'BRICKNAME-OBJID'), and evaluate's predictions.csv, predict's Parquet and HDF5
catalogues (verify, qp export), embeddings, search and anomaly tables and the split/overlap checks carry exactly
those ids, in the right rows: strings character for character (leading zeros, digits only, commas, quotes, spaces,
non-ASCII), 64-bit integers beyond 2^53 exactly. (SDSS stores keep ObjID/specObjID: test_predict, test_similarity,
test_evaluate_outputs, test_finetune.) Tiny: width-8 ResNet-18 on 16 px crops of 24 px cutouts, 2-3 steps."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY_MODEL, blob_images

from photoz_hpc import mmu_layout as L
from photoz_hpc.cli import main
from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.data import open_dataset
from photoz_hpc.data.prepare import prepare
from photoz_hpc.data.splits import load_ids
from photoz_hpc.errors import ConfigError, PhotozError
from photoz_hpc.evaluate import ids as galaxy_ids
from photoz_hpc.evaluate.catalogue import (
    COLUMNS,
    DONE_DIR,
    MANIFEST_NAME,
    PLAN_NAME,
    PredictOptions,
    columns_for,
    part_path,
    read_catalogue,
    read_part,
    run_predict,
    verify_catalogue,
    write_part,
)
from photoz_hpc.evaluate.embeddings import ID_DTYPE, INDEX_NAME, Embeddings, embed_dataset
from photoz_hpc.evaluate.predictions import csv_text, parse_csv, read_predictions, write_predictions
from photoz_hpc.evaluate.run import run_evaluate, training_overlap
from photoz_hpc.io_utils import atomic_write_json, sha256_file
from photoz_hpc.launch.finetune_eval import finetune_and_evaluate
from photoz_hpc.train.finetune import run_finetune
from photoz_hpc.train.pretrain import run_pretrain

SIZE, N = 24, 32
BANDS = ["des-g", "des-r", "des-z"]  # Legacy Surveys g r z: both stores have the same bands
#: string ids that a careless writer or reader would change: leading zeros, digits only (also a valid dataset
#: index), a comma, a quote, spaces, non-ASCII
TRICKY = {3: "00012", 4: "12", 5: "0001m002,7", 6: 'q"uote', 7: " sp ace ", 8: "Ωmega-3"}
STRING_IDS = [TRICKY.get(i, f"0001m002-{i:05d}") for i in range(N)]
INT_IDS = (np.arange(N, dtype=np.int64) * 7 + 36_000_000_000_000_001).tolist()  # beyond 2^53: a float would round
TINY = [*TINY_MODEL, "model.embed_dim=16", "augment.crop_size=16", "augment.jitter_max=2", "loader.batch_size=8",
        "loader.backend=reference", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "dist.backend=none", "seed=2"]
EVAL_OV = ["loader.backend=reference", "dist.backend=none", "train.precision=fp32"]


def mmu_store(root: Path, name: str, ids: list, seed: int, labeled: bool = True) -> Path:
    """A 3-band Multimodal Universe store (two healpix files, shards of 12) with these ids and z_spec labels."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    images = blob_images(n, SIZE, seed)[:, :3] * 0.1
    cols = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 30, n),
            "ebv": rng.uniform(0.01, 0.1, n).astype(np.float32)}
    if labeled:
        cols["z_spec"] = rng.uniform(0.02, 0.7, n).astype(np.float32)
    half = n // 2
    for k, rows in enumerate((slice(0, half), slice(half, n))):
        L.write_mmu_file(L.healpix_file(root / f"{name}_in", "south", k + 1), images[rows], BANDS, 0.262,
                         [1.2, 1.1, 1.0], np.asarray(ids)[rows], {c: v[rows] for c, v in cols.items()})
    return prepare([root / f"{name}_in"], root / name, samples_per_shard=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A string-id and an int-id store of the same bands; MoCo pretraining (2 steps) and fine-tuning (3 steps,
    which evaluates its validation split: the MMU crash) on the string-id one."""
    root = tmp_path_factory.mktemp("object_ids")
    text = mmu_store(root, "text", STRING_IDS, seed=1)
    ints = mmu_store(root, "ints", INT_IDS, seed=2)
    pre = run_pretrain(load_config(None, [*TINY, "moco.queue_size=16", "train.max_steps=2", f"data.path={text}",
                                          f"out_dir={root / 'pre'}"]))
    finetune_and_evaluate(load_config(None, [*TINY, "optim.batch_ref=8", "train.max_steps=3",
                                             f"finetune.init={pre['encoder']}", f"data.path={text}",
                                             f"out_dir={root / 'ft'}"], root=FinetuneRunConfig))
    return {"root": root, "text": text, "ints": ints, "encoder": Path(pre["encoder"]), "ft": root / "ft",
            "model": root / "ft" / "best_model.pt"}


def _check_ids(ds, index: np.ndarray, got: np.ndarray) -> None:
    """``got`` holds exactly the store's ids of rows ``index``, in the store's kind."""
    want = ds.object_ids[np.asarray(index, dtype=np.int64)]
    assert got.dtype.kind == want.dtype.kind, (got.dtype, want.dtype)
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------------- the stores


def test_the_stores_hold_the_ids_as_given(world):
    text, ints = open_dataset(world["text"]), open_dataset(world["ints"])
    assert text.id_field == ints.id_field == "object_id"
    assert text.object_ids.tolist() == STRING_IDS and ints.object_ids.tolist() == INT_IDS
    assert galaxy_ids.id_fields(text) == ("object_id",) and galaxy_ids.id_column_of(text) == ("object_id", "string")
    assert galaxy_ids.id_column_of(ints) == ("object_id", "int64")
    with pytest.raises(PhotozError, match=r"name their galaxies differently.*object_id \(string\).*object_id \(int64\)"):
        galaxy_ids.shared_id_column([text, ints])


# ---------------------------------------------------------------------- evaluate: predictions.csv


def test_finetune_evaluates_an_mmu_store_and_its_predictions_carry_the_string_ids(world):
    ds = open_dataset(world["text"])
    path = world["ft"] / "eval" / "predictions.csv"
    back = read_predictions(path)
    assert list(back)[:3] == ["index", "object_id", "z_spec"]
    val = load_ids(world["ft"] / "val_ids.npy")
    assert sorted(back["index"].tolist()) == sorted(val.tolist())
    _check_ids(ds, back["index"], back["object_id"])
    np.testing.assert_array_equal(back["z_spec"], ds.meta["specz_redshift"][back["index"]])
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, row in zip(back["index"], lines[1:], strict=True):  # string ids are quoted: '00012' is no number
        assert row.split(",")[1].startswith('"'), row
        if STRING_IDS[i] == "00012":
            assert ',"00012",' in row


def test_evaluate_an_int_id_store_writes_int64_object_ids(world, tmp_path):
    report = run_evaluate(world["model"], world["ints"], tmp_path / "ev", overrides=EVAL_OV)
    back = read_predictions(tmp_path / "ev" / "predictions.csv")
    assert report["n"] == N and list(back)[:2] == ["index", "object_id"] and "ObjID" not in back
    assert back["object_id"].dtype == np.int64
    _check_ids(open_dataset(world["ints"]), back["index"], back["object_id"])
    # the training galaxies are matched by object_id on another store: a store of some of them is counted
    text = open_dataset(world["text"])
    train = load_ids(world["ft"] / "train_ids.npy")
    overlap = training_overlap(world["model"], text, np.arange(N))
    assert overlap["n_training_galaxies"] == len(train)  # the training store itself: by dataset index
    ids = [STRING_IDS[i] for i in range(0, N, 2)] + ["not-a-training-galaxy"]
    other = open_dataset(mmu_store(tmp_path, "other", ids, seed=3))
    got = training_overlap(world["model"], other, np.arange(len(ids)))
    assert got["n_training_galaxies"] == len(set(ids) & {STRING_IDS[i] for i in train}) > 0
    assert training_overlap(world["model"], open_dataset(world["ints"]), np.arange(N)) is None  # not comparable


def test_predictions_csv_round_trips_string_ids_exactly(tmp_path):
    ids = np.array([*TRICKY.values(), "line\nbreak", "", "0001m002-00012"])
    n = len(ids)
    summary = {k: np.linspace(0.1, 0.2, n) for k in ("z_phot", "z_mode", "z_lo68", "z_hi68")}
    path = write_predictions(tmp_path / "p.csv", {"index": np.arange(n), "object_id": ids}, np.full(n, 0.5), summary)
    back = read_predictions(path)
    assert back["object_id"].dtype.kind == "U" and back["object_id"].tolist() == ids.tolist()
    assert back["index"].dtype == np.int64 and back["index"].tolist() == list(range(n))
    import csv  # any CSV reader gets the same strings back

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert [r[1] for r in rows[1:]] == ids.tolist()
    header, cells, quoted = parse_csv(csv_text(["a", "b"], [[1, "x,y"], [2, "z"]], quoted=[]), "t")
    assert header == ["a", "b"] and cells == [["1", "2"], ["x,y", "z"]] and quoted == [False, True]
    with pytest.raises(ValueError, match=r"t:2: 3 fields, header has 2"):
        parse_csv("a,b\n1,2,3\n", "t")
    with pytest.raises(ValueError, match="must be integers or strings"):
        write_predictions(tmp_path / "q.csv", {"object_id": np.array([b"x", b"y"])}, [0.1, 0.2],
                          {k: v[:2] for k, v in summary.items()})


# ---------------------------------------------------------------------- predict: Parquet and HDF5 catalogues


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_catalogue_parts_carry_string_ids_and_verify_and_qp_export_read_them(world, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    ds = open_dataset(world["text"])
    cat = tmp_path / "cat"
    report = run_predict(world["model"], [world["text"]], cat, PredictOptions(fmt=fmt, with_pdf=True),
                         overrides=EVAL_OV)
    assert report["complete"] and report["rows"] == N
    plan = json.loads((cat / PLAN_NAME).read_text())
    assert plan["id_column"] == "object_id" and plan["columns"][0] == "object_id"
    assert plan["column_dtypes"]["object_id"] == "string" and "ObjID" not in plan["columns"]
    assert json.loads((cat / MANIFEST_NAME).read_text())["id_column"] == "object_id"
    got = read_catalogue(cat)
    _check_ids(ds, got["index"], got["object_id"])
    assert got["index"].tolist() == list(range(N))
    first = part_path(cat, plan["parts"][0]["name"], fmt)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert str(pq.read_schema(first).field("object_id").type) == "string"
    else:
        with h5py.File(first, "r") as fh:
            assert h5py.check_string_dtype(fh["object_id"].dtype).encoding == "utf-8"
    rep = verify_catalogue(cat)
    assert rep["ok"] and rep["id_column"] == "object_id" and rep["duplicate_objids"] == 0, rep
    assert main(["catalogue-verify", str(cat)]) == 0

    # a part whose ids differ from its input (sha256 and marker consistent) is reported by verify
    part = plan["parts"][1]
    path = part_path(cat, part["name"], fmt)
    cols = read_part(path)
    cols["object_id"] = np.array(["0" + v for v in cols["object_id"].tolist()])
    write_part(path, cols, fmt, {})
    marker = cat / DONE_DIR / f"{part['name']}.json"
    done = json.loads(marker.read_text()) | {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_json(marker, done)
    rep = verify_catalogue(cat, write_manifest=False)
    assert not rep["ok"] and any(f"part {part['name']}: object_ids differ" in p for p in rep["problems"]), rep


def test_qp_export_names_galaxies_by_the_string_ids(world, tmp_path):
    qp = pytest.importorskip("qp")
    pytest.importorskip("pyarrow")
    cat = tmp_path / "cat"
    run_predict(world["model"], [world["text"]], cat, PredictOptions(with_pdf=True), overrides=EVAL_OV)
    out = tmp_path / "pdfs.hdf5"
    assert main(["export-qp", str(cat), str(out)]) == 0
    ens = qp.read(str(out))
    ancil = galaxy_ids.as_ids(ens.ancil["object_id"], galaxy_ids.STRING_LABEL)
    assert ancil.tolist() == STRING_IDS and "ObjID" not in ens.ancil


def test_int_id_catalogue_and_mixed_inputs(world, tmp_path):
    pytest.importorskip("pyarrow")
    cat = tmp_path / "cat"
    run_predict(world["model"], [world["ints"]], cat, PredictOptions(fmt="parquet"), overrides=EVAL_OV)
    got = read_catalogue(cat)
    assert got["object_id"].dtype == np.int64
    _check_ids(open_dataset(world["ints"]), got["index"], got["object_id"])
    plan = json.loads((cat / PLAN_NAME).read_text())
    assert plan["column_dtypes"] == columns_for("object_id", "int64") and list(plan["column_dtypes"])[1:] == list(COLUMNS)[1:]
    assert verify_catalogue(cat)["ok"]
    # one catalogue holds one id column: string and int ids together are refused before any work
    with pytest.raises(PhotozError, match="name their galaxies differently"):
        run_predict(world["model"], [world["text"], world["ints"]], tmp_path / "mixed", PredictOptions(),
                    overrides=EVAL_OV)
    assert not (tmp_path / "mixed").exists()


# ---------------------------------------------------------------------- embed, search, anomalies


@pytest.fixture(scope="module")
def embedded(world) -> dict:
    out = {}
    for name in ("text", "ints"):
        out[name] = world["root"] / f"emb_{name}"
        embed_dataset(world["encoder"], world[name], out[name], "projection", ["loader.batch_size=8", *EVAL_OV])
    return out


def test_embeddings_record_the_store_ids(world, embedded):
    for name, ids in (("text", STRING_IDS), ("ints", INT_IDS)):
        emb = Embeddings(embedded[name])
        index = json.loads((embedded[name] / INDEX_NAME).read_text())
        assert emb.id_field == index["id_field"] == "object_id"
        assert emb.ids.dtype.names == ("index", "object_id") and emb.object_ids.tolist() == ids
        assert np.dtype(index["id_dtype"]) == open_dataset(world[name]).meta_dtype["object_id"]
        stored = np.load(embedded[name] / emb.index["parts"][0]["ids"], allow_pickle=False)  # plain npy, no pickle
        assert stored.dtype.names == ("index", "object_id")


def test_search_by_string_id_and_its_tables_and_json(world, embedded, tmp_path, capsys):
    emb = Embeddings(embedded["text"])
    out = tmp_path / "search"
    # '12' is the id of row 4 (a string), not row 12; '00012' is row 3
    assert main(["search", str(embedded["text"]), "--query", "12", "00012", "0001m002-00020", "--objid", "--k", "3",
                 "--out", str(out), "--no-figure", "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [q["query"] for q in result["queries"]] == [4, 3, 20]
    assert [q["object_id"] for q in result["queries"]] == ["12", "00012", "0001m002-00020"]
    for q in result["queries"]:
        assert [n["object_id"] for n in q["neighbours"]] == [STRING_IDS[n["index"]] for n in q["neighbours"]]
    header, cells, quoted = parse_csv((out / "search.csv").read_text(encoding="utf-8"), "search.csv")
    assert header == ["query", "query_object_id", "rank", "index", "object_id", "similarity", "z_spec"]
    table = dict(zip(header, cells, strict=True))
    assert quoted[1] and quoted[4] and not quoted[0]
    assert table["query_object_id"] == [STRING_IDS[int(q)] for q in table["query"]]
    assert table["object_id"] == [STRING_IDS[int(i)] for i in table["index"]]
    # by dataset index as before; a string id given without --objid says what to do
    assert main(["search", str(embedded["text"]), "--query", "6", "--k", "2", "--out", str(out), "--no-figure",
                 "--backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"][0]["object_id"] == 'q"uote'
    assert main(["search", str(embedded["text"]), "--query", "0001m002-00020", "--k", "2", "--no-figure"]) == 1
    assert "object_ids of this set: pass --objid" in capsys.readouterr().err
    with pytest.raises(PhotozError, match=r"object_id\(s\) \['0001m002-0020'\] are not in"):
        emb.lookup(["0001m002-0020"], "id")  # one zero fewer: another id


def test_search_by_int_id_and_anomaly_tables(world, embedded, tmp_path, capsys):
    assert main(["search", str(embedded["ints"]), "--query", str(INT_IDS[9]), "--objid", "--k", "2", "--no-figure",
                 "--out", str(tmp_path / "s"), "--backend", "torch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"][0]["query"] == 9 and result["queries"][0]["object_id"] == INT_IDS[9]
    assert main(["search", str(embedded["ints"]), "--query", "0001m002-00020", "--objid", "--no-figure"]) == 1
    assert "is not an integer" in capsys.readouterr().err
    for name, ids in (("text", STRING_IDS), ("ints", INT_IDS)):
        out = tmp_path / f"anom_{name}"
        assert main(["anomalies", str(embedded[name]), "--top", "5", "--k", "3", "--out", str(out), "--no-figure",
                     "--backend", "torch"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert [t["object_id"] for t in result["top"]] == [ids[t["index"]] for t in result["top"]]
        header, cells, quoted = parse_csv((out / "anomaly_scores.csv").read_text(encoding="utf-8"), "scores")
        assert header == ["index", "object_id", "score", "rank", "z_spec"] and quoted[1] == (name == "text")
        got = cells[1] if name == "text" else [int(v) for v in cells[1]]
        assert got == [ids[int(i)] for i in cells[0]] and len(got) == N
        header, cells, _ = parse_csv((out / "top.csv").read_text(encoding="utf-8"), "top")
        got = cells[2] if name == "text" else [int(v) for v in cells[2]]
        assert header[2] == "object_id" and got == [t["object_id"] for t in result["top"]]


def test_embeddings_written_before_object_ids_still_load(tmp_path):
    """An index without id_field/id_dtype and ('index', 'ObjID') id files: read as SDSS ObjIDs."""
    root = tmp_path / "old"
    root.mkdir()
    vec = np.eye(3, 4, dtype=np.float32)
    ids = np.zeros(3, ID_DTYPE)
    ids["index"], ids["ObjID"] = np.arange(3), [1237650000000000007, 5, 9]
    np.save(root / "part-00000.npy", vec)
    np.save(root / "part-00000.ids.npy", ids)
    index = {"format": "photoz-hpc/embeddings/1", "dataset": "x", "fingerprint": "y", "n": 3, "dim": 4,
             "parts": [{"rank": 0, "file": "part-00000.npy", "ids": "part-00000.ids.npy", "first": 0, "count": 3}]}
    (root / INDEX_NAME).write_text(json.dumps(index))
    emb = Embeddings(root)
    assert emb.id_field == "ObjID" and emb.object_ids.tolist() == [1237650000000000007, 5, 9]
    assert emb.lookup([1237650000000000007, "9"], "objid").tolist() == [0, 2]
    with pytest.raises(PhotozError, match="SDSS ObjIDs of this set: pass --objid"):
        emb.lookup([1237650000000000007], "index")


# ---------------------------------------------------------------------- splits


def test_a_validation_store_sharing_object_ids_is_refused(world, tmp_path):
    overlap = mmu_store(tmp_path, "val", [STRING_IDS[i] for i in range(0, N, 3)] + ["fresh-1", "fresh-2"], seed=4)
    args = [*TINY, "optim.batch_ref=8", "train.max_steps=1", f"finetune.init={world['encoder']}",
            f"data.path={world['text']}", f"finetune.val_data={overlap}", f"out_dir={tmp_path / 'ft'}"]
    with pytest.raises(ConfigError, match=r"overlaps training set .* share an object_id"):
        run_finetune(load_config(None, args, root=FinetuneRunConfig))
    assert not (tmp_path / "ft" / "checkpoints").exists()
