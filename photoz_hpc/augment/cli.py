"""Command ``augment``: show what the network will see (RGB grid or an .npz of the views)."""

from __future__ import annotations

import argparse

from photoz_hpc.augment.pipelines import PIPELINES, Pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "augment",
        help="render augmented views of a dataset (PNG grid or .npz)",
        description="Run a loader pipeline on the first samples of a dataset and save the views: a PNG of RGB "
        "cutouts (several views of a sample side by side) or, for --out *.npz, arrays 'views' and 'ids'.",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. augment.noise=false)")
    p.add_argument("--data", help="dataset directory (default: data.path of the config)")
    p.add_argument("--pipeline", choices=list(PIPELINES), default="pretrain",
                   help="which loader pipeline draws the views (default pretrain)")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--out", required=True, help="output .png or .npz")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--seed", type=int, help="random seed (default: the config's seed)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose shuffle and draws to show")
    p.set_defaults(func=_augment)


def _augment(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from photoz_hpc.augment.loaders import build_loader
    from photoz_hpc.config import load_config
    from photoz_hpc.data import open_dataset
    from photoz_hpc.errors import ConfigError

    cfg = load_config(args.config, list(args.overrides))
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise ConfigError(f"--out must end in .png or .npz, got '{out}'")
    ds = open_dataset(args.data or cfg.data.path)
    cfg.loader.batch_size = args.n
    loader = build_loader(cfg, ds, args.pipeline, seed=args.seed, device="cpu")
    if len(loader) == 0:
        raise ConfigError(f"--n {args.n} is more than the {args.pipeline} pipeline's {len(ds)} usable samples")
    loader.set_epoch(args.epoch)
    batch = next(iter(loader))
    pipeline = loader.pipeline
    keep = np.ones(args.n, bool) if pipeline.training else batch["valid"].numpy()
    ids = batch["index"].numpy()[keep]
    views = [batch[key].contiguous().numpy() for key in pipeline.view_keys]
    views = np.stack(views, axis=1) if pipeline.n_views > 1 else views[0]  # (n, [views,] C, S, S)
    views = np.ascontiguousarray(views[keep], dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        np.savez(out, views=views, ids=ids.astype(np.int64))
    else:
        _save_png(views, ids, pipeline, out, loader.source.spec.survey)
    print(out)
    return 0


def _save_png(views, ids, pipeline: Pipeline, out, survey) -> None:
    """Grid of RGB cutouts via photoz_hpc.viz (several views of a sample side by side), in the preview bands of
    the dataset's survey (``Survey.rgb``)."""
    from photoz_hpc.viz import save_grid

    if pipeline.n_views > 1:
        images = views.reshape(-1, *views.shape[2:])
        labels = [f"{i} v{v + 1}" for i in ids for v in range(pipeline.n_views)]
    else:
        images, labels = views, [str(i) for i in ids]
    save_grid(images, labels, out, ncols=8, survey=survey)
