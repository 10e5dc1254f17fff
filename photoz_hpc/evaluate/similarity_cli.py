"""``photoz-hpc embed``, ``search`` and ``anomalies``: embeddings of a survey, similar galaxies, unusual ones.

Tables and JSON name galaxies by their dataset index and the store's galaxy id under its own name (``ObjID`` for
SDSS stores, ``object_id`` for Multimodal Universe ones; string ids quoted in CSV, exact in JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from photoz_hpc.torch_files import add_trust_pickle_flag


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "embed", help="L2-normalised embeddings of every galaxy of a dataset (all ranks, streamed to disk)",
        description="Embed every galaxy of a prepared dataset with a MoCo checkpoint or an encoder.pt: the "
        "projection output (model.embed_dim, 128 in the paper) or the trunk's pooled feature, L2-normalised, on "
        "the eval pipeline (dereddened, centre crop). Launch like training (srun/torchrun/horovodrun) to use "
        "several ranks; each galaxy is embedded once. Writes EMB/index.json and one .npy part per rank.")
    e.add_argument("--checkpoint", required=True, help="MoCo checkpoint (checkpoints/ckpt_*.pt) or encoder.pt")
    e.add_argument("--data", required=True, help="prepared dataset directory")
    e.add_argument("--out", required=True, help="output directory EMB")
    e.add_argument("--feature", choices=("projection", "trunk"), default="projection",
                   help="projection: the MoCo head's output (default); trunk: the ResNet's pooled feature")
    e.add_argument("overrides", nargs="*", help="loader/augment/train/dist overrides, e.g. loader.batch_size=512 "
                   "loader.device=cpu augment.crop_size=64 (an encoder.pt carries no augment settings)")
    add_trust_pickle_flag(e)
    e.set_defaults(func=_embed)

    s = subparsers.add_parser(
        "search", help="the most similar galaxies to query galaxies (dot product of embeddings), with a figure",
        description="Top-k most similar galaxies by dot product of the embeddings (exact; faiss when installed, "
        "else torch), written to EMB/search/ (or --out) as CSV and as a figure of asinh RGB cutouts with redshifts "
        "(the paper's Figure 1).")
    s.add_argument("emb", help="embedding directory written by embed")
    s.add_argument("--query", required=True, nargs="+", help="query galaxies: dataset indices, or with --objid the "
                   "store's galaxy ids (SDSS ObjID; Multimodal Universe object_id, integer or string)")
    s.add_argument("--objid", "--object-id", dest="objid", action="store_true",
                   help="--query values are the store's galaxy ids (ObjID or object_id), not dataset indices")
    s.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    _common(s)
    s.set_defaults(func=_search)

    a = subparsers.add_parser(
        "anomalies", help="the most unusual galaxies: 1 - mean similarity to their k nearest neighbours",
        description="Score every galaxy by 1 - mean similarity to its k nearest neighbours (itself excluded); "
        "write every score (anomaly_scores.csv), the --top most unusual (top.csv) and their cutouts.")
    a.add_argument("emb", help="embedding directory written by embed")
    a.add_argument("--top", type=int, default=50, help="how many to list and draw (default 50)")
    a.add_argument("--k", type=int, default=10, help="neighbours in the score (default 10)")
    _common(a)
    a.set_defaults(func=_anomalies)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="the dataset (default: the one recorded by embed; it must be the same)")
    p.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto", help="search backend (default auto)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--crop", type=int, default=None, help="central crop of the drawn cutouts in pixels (default: the "
                   "crop the embeddings were made with, SDSS 64)")
    p.add_argument("--no-figure", action="store_true", help="skip the figure")


def _crop(args: argparse.Namespace, emb) -> int | None:
    """The drawn crop: --crop, else the one the embeddings were made with."""
    return args.crop if args.crop is not None else emb.index.get("crop_size")


def _embed(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.embeddings import embed_dataset
    from photoz_hpc.launch_env import detect_env

    index = embed_dataset(args.checkpoint, args.data, args.out, args.feature, args.overrides)
    if detect_env().rank == 0:
        print(json.dumps({k: index[k] for k in ("dataset", "n", "dim", "feature", "world_size")} | {"out": args.out},
                         indent=2))
    return 0


def _write_rows(path: Path, header: list[str], rows: list[list], emb) -> None:
    """A UTF-8 CSV table, atomically (``predictions.write_csv``). ``header`` names the galaxy id ``ObjID`` (the SDSS
    columns, as docs/similarity.md lists them); the columns take the embeddings' own id name (``object_id``), and
    string ids are always quoted."""
    from photoz_hpc.evaluate.predictions import write_csv

    names = [h.replace("ObjID", emb.id_field) for h in header]
    quoted = [i for i, h in enumerate(header) if "ObjID" in h] if emb.object_ids.dtype.kind == "U" else []
    write_csv(path, names, rows, quoted)


def _search(args: argparse.Namespace) -> int:
    from photoz_hpc.evaluate.embeddings import Embeddings
    from photoz_hpc.evaluate.ids import id_value
    from photoz_hpc.evaluate.similarity import plot_search, resolve_backend, search_rows

    emb = Embeddings(args.emb)
    dataset = emb.dataset(args.data)
    q = emb.lookup(args.query, "id" if args.objid else "index")
    backend = resolve_backend(args.backend)
    sims, rows = search_rows(emb, q, args.k, backend)
    out = Path(args.out) if args.out else emb.root / "search"
    out.mkdir(parents=True, exist_ok=True)
    z, field, obj = dataset.meta["specz_redshift"], emb.id_field, emb.object_ids
    table = [[int(qi), id_value(obj[qi]), rank + 1, int(r), id_value(obj[r]), f"{s:.6f}", float(z[r])]
             for qi, s_row, r_row in zip(q, sims, rows, strict=True)
             for rank, (s, r) in enumerate(zip(s_row, r_row, strict=True))]
    _write_rows(out / "search.csv", ["query", "query_ObjID", "rank", "index", "ObjID", "similarity", "z_spec"], table, emb)
    result = {"backend": backend, "k": args.k, "csv": str(out / "search.csv"), "id_field": field,
              "queries": [{"query": int(qi), field: id_value(obj[qi]), "z_spec": float(z[qi]),
                           "neighbours": [{"index": int(r), field: id_value(obj[r]), "similarity": float(s),
                                           "z_spec": float(z[r])}
                                          for s, r in zip(s_row, r_row, strict=True)]}
                          for qi, s_row, r_row in zip(q, sims, rows, strict=True)]}
    if not args.no_figure:
        result["figure"] = str(plot_search(dataset, q, sims, rows, out / "search.png", _crop(args, emb)))
    print(json.dumps(result, indent=2))
    return 0


def _anomalies(args: argparse.Namespace) -> int:
    import numpy as np

    from photoz_hpc.errors import PhotozError
    from photoz_hpc.evaluate.embeddings import Embeddings
    from photoz_hpc.evaluate.ids import id_value
    from photoz_hpc.evaluate.similarity import anomaly_scores, plot_anomalies, resolve_backend

    if args.top < 1:
        raise PhotozError(f"--top must be >= 1, got {args.top}")
    emb = Embeddings(args.emb)
    dataset = emb.dataset(args.data)
    backend = resolve_backend(args.backend)
    scores = anomaly_scores(emb, args.k, backend)
    order = np.argsort(-scores, kind="stable")
    top = order[: args.top]
    out = Path(args.out) if args.out else emb.root / "anomalies"
    out.mkdir(parents=True, exist_ok=True)
    z, field, obj = dataset.meta["specz_redshift"], emb.id_field, emb.object_ids
    rank_of = np.empty(len(order), np.int64)
    rank_of[order] = np.arange(1, len(order) + 1)
    _write_rows(out / "anomaly_scores.csv", ["index", "ObjID", "score", "rank", "z_spec"],
                [[i, id_value(obj[i]), f"{scores[i]:.6f}", int(rank_of[i]), float(z[i])] for i in range(len(scores))], emb)
    _write_rows(out / "top.csv", ["rank", "index", "ObjID", "score", "z_spec"],
                [[n + 1, int(i), id_value(obj[i]), f"{scores[i]:.6f}", float(z[i])] for n, i in enumerate(top)], emb)
    result = {"backend": backend, "k": args.k, "n": len(scores), "scores": str(out / "anomaly_scores.csv"),
              "id_field": field,
              "top": [{"rank": n + 1, "index": int(i), field: id_value(obj[i]), "score": float(scores[i])}
                      for n, i in enumerate(top)]}
    if not args.no_figure:
        result["figure"] = str(plot_anomalies(dataset, top, scores, out / "anomalies.png", _crop(args, emb)))
    print(json.dumps(result, indent=2))
    return 0
