"""The SDSS regression fingerprint: store bytes, augmentation draws, synthetic catalogue and training losses.

``python tests/sdss_regression.py record`` wrote ``tests/data/sdss_regression.json`` *before* surveys other than
SDSS existed (commit a4af560's tree); ``tests/test_sdss_regression.py`` recomputes the fingerprint and compares,
so the SDSS defaults stay bit-identical to the SDSS-only code. Re-record only for a deliberate change, and say so.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import blob_images, tiny_overrides, write_release_h5  # noqa: E402

RECORD = Path(__file__).resolve().parent / "data" / "sdss_regression.json"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def store_fingerprint(root: Path) -> tuple[Path, dict]:
    from photoz_hpc.data.prepare import prepare

    h5 = write_release_h5(root / "release.h5", 96, seed=11, size=24, images=blob_images(96, 24, 11))
    out = prepare([h5], root / "prepared", samples_per_shard=40, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = {s["file"]: [s["sha256"], s["meta_sha256"]] for s in manifest["shards"]}
    keep = ("image_shape", "bands", "record_bytes", "count", "labeled_count", "meta_fields", "pixel_stats", "r_dr12")
    return out, {"shards": shards, "manifest": {k: manifest[k] for k in keep}}


def draws_fingerprint(data: Path) -> dict:
    from photoz_hpc.augment.draws import draw_views, generator, resolve_spec
    from photoz_hpc.config import AugmentConfig
    from photoz_hpc.data.dataset import ShardedDataset

    manifest = ShardedDataset(data).manifest
    out = {}
    for pipeline in ("pretrain", "finetune"):
        spec = resolve_spec(AugmentConfig(crop_size=16, jitter_max=2), manifest, pipeline)
        views = draw_views(spec, generator(3, 1, 0, 2), 12, np.linspace(0.0, 0.2, 12))
        out[pipeline] = [{k: _sha(np.asarray(v)) for k, v in sorted(vars(view).items())} for view in views]
    return out


def synth_fingerprint() -> dict:
    from photoz_hpc.sim.survey import render_chunk

    cols = render_chunk(7, 0, 3, labeled=True, neighbours=False)
    return {"catalogue": {k: _sha(v) for k, v in sorted(cols.items()) if k != "images"},
            "image_sums": cols["images"].astype(np.float64).sum(axis=(2, 3)).tolist()}


def loss_fingerprint(data: Path, root: Path) -> dict:
    from photoz_hpc.config import FinetuneRunConfig, load_config
    from photoz_hpc.train.finetune import run_finetune
    from photoz_hpc.train.pretrain import run_pretrain

    pre = run_pretrain(load_config(None, tiny_overrides(data, root / "pre", 16, 32, ("train.max_steps=4",))))
    ft_overrides = [o for o in tiny_overrides(data, root / "ft", 16, 0) if not o.startswith(("moco.", "optim.batch_ref"))]
    run_finetune(load_config(None, [*ft_overrides, "train.max_steps=4", f"finetune.init={pre['encoder']}"],
                                  root=FinetuneRunConfig))

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    return {"pretrain": losses(root / "pre"), "finetune": losses(root / "ft")}


def fingerprint() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, store = store_fingerprint(root)
        return {"store": store, "draws": draws_fingerprint(data), "synth": synth_fingerprint(),
                "losses": loss_fingerprint(data, root)}


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/sdss_regression.py record")
    RECORD.write_text(json.dumps(fingerprint(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
