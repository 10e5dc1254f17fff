"""The Python API: photo-z and embeddings of arrays, similarity search, fine-tuning and evaluation from a notebook.

``import photoz_hpc as pz`` exposes these names (lazily: ``import photoz_hpc`` stays light)::

    model = pz.load_model("runs/finetune/best_model.pt")     # or photoz_model.pt, a checkpoint, an exported directory
    out = model.predict(images, ebv=ebv, pdf=True, tta=4)    # images (N, bands, H, W): z_phot, z_mode, ..., pdf
    enc = pz.load_encoder("runs/pretrain/encoder.pt")        # or a MoCo checkpoint
    emb = enc.embed(images, ebv=ebv)                         # (N, dim) float32, L2-normalised
    hits = pz.search(emb, [0, 5], k=5); scores = pz.anomalies(emb, k=10)
    pz.prepare_arrays(images, "data/mine", survey="legacy", ebv=ebv, z_spec=z)
    run_dir, summary = pz.finetune("data/mine", init="runs/pretrain/encoder.pt", overrides={"train.epochs": 5})
    report = pz.evaluate_model(run_dir / "best_model.pt", "data/test")

Every function is the command's own code, not a copy: predictions are ``predict``'s (the eval view of
``augment.arrays``, ``batch_log_probs``, ``evaluate.arrays.photoz_summaries``: the catalogue columns), embeddings
``embed``'s (``embed_config``, ``embed_batch``), ``search``/``anomalies`` the commands' (``similarity.search_rows``,
``anomaly_scores``), ``finetune`` runs ``finetune_and_evaluate`` as ``photoz-hpc finetune`` does, ``evaluate_model``
``run_evaluate`` as ``photoz-hpc evaluate`` does, and ``prepare_arrays`` the real ``prepare``. Errors are exceptions
(``ValueError`` for bad arrays, ``PhotozError`` for files and configs) with the commands' messages.

Overrides are a mapping of dotted config keys to Python values (``{"train.max_steps": 3, "loader.backend":
"reference"}``; finite numbers only), or ``key=value`` strings as on a command line.

Stopping ``finetune`` (Ctrl-C in a notebook) stops after a checkpoint and raises ``KeyboardInterrupt``; a
scheduler's pre-emption signal raises ``PhotozError``; either way the same call again resumes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photoz_hpc.config import FinetuneRunConfig, load_config
from photoz_hpc.data.arrays import prepare_arrays
from photoz_hpc.errors import PhotozError
from photoz_hpc.evaluate import arrays
from photoz_hpc.evaluate.calibration import read_temperature
from photoz_hpc.evaluate.catalogue import check_predict_options, forward_setup, resolve_batch_size
from photoz_hpc.evaluate.embeddings import FEATURES, Embedder, Embeddings, embed_config, load_embedder
from photoz_hpc.evaluate.run import load_network, run_evaluate
from photoz_hpc.evaluate.similarity import anomaly_scores, knn, search_rows
from photoz_hpc.survey import RedshiftGrid, Survey
from photoz_hpc.train.precision import resolve_precision

__all__ = ["Encoder", "PhotoZModel", "anomalies", "evaluate_model", "finetune", "load_encoder", "load_model",
           "prepare_arrays", "search"]


def _plain_value(key: str, value: Any) -> Any:
    """An override's value as JSON-able plain data: paths as text, numpy scalars as Python numbers; NaN and inf
    refused (JSON would write them as NaN/Infinity, which YAML reads back as strings, not numbers)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"overrides: {key}={value!r} is not a finite number: config values are finite (give a "
                         "number, or leave the key out for its default)")
    if isinstance(value, (list, tuple)):
        return [_plain_value(key, v) for v in value]
    return value


def override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``key=value`` texts of ``overrides``: a mapping's values written as JSON (which YAML reads back as the same
    string, number, bool, None or list; NaN/inf refused), or ``key=value`` strings as given."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(_plain_value(str(key), value))}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise TypeError("overrides: a mapping {'section.key': value} or a list of 'key=value' strings, not one string")
    return [str(o) for o in overrides]


# ---------------------------------------------------------------------- photo-z models


class _Views:
    """What a loaded network's inputs must be, from its survey and its recorded view settings (both classes below)."""

    survey: Survey
    config: Any

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.survey.bands)

    @property
    def crop_size(self) -> int:
        return int(self.config.augment.crop_size)

    @property
    def dereddens(self) -> bool:
        return bool(self.config.augment.deredden)


class PhotoZModel(_Views):
    """A photo-z network with the view it was trained on: ``predict`` gives ``photoz-hpc predict``'s numbers for
    arrays. ``survey`` (``bands``: the channel order it reads), ``grid`` (its redshift bins), ``crop_size`` and
    ``dereddens`` (whether ``predict`` needs ``ebv``) come from its file; ``config`` is the resolved run config."""

    def __init__(self, net, config: FinetuneRunConfig, meta: dict[str, Any], path: Path,
                 device: torch.device) -> None:
        self.net, self.config, self.meta, self.path = net, config, meta, path
        self.device = device
        self.net.to(device).eval()

    @property
    def survey(self) -> Survey:
        return self.net.survey

    @property
    def grid(self) -> RedshiftGrid:
        return self.net.grid

    def to(self, device: str | torch.device) -> PhotoZModel:
        """Move the network to ``device`` (e.g. ``'cuda'``); returns the model."""
        self.device = arrays.pick_device(device)
        self.net.to(self.device)
        return self

    def __repr__(self) -> str:
        g = self.grid
        return (f"PhotoZModel({str(self.path)!r}: {self.config.model.arch}/{self.config.model.width}, bands "
                f"{''.join(self.bands)} ({self.survey.name}), {g.n_bins} bins over [{g.z_min:g}, {g.z_max:g}), "
                f"crop {self.crop_size}, {'dereddens' if self.dereddens else 'no dereddening'}, {self.device})")

    def predict(self, images: Any, ebv: Any = None, *, batch_size: int | None = None, tta: int = 1,
                pdf: bool = False, temperature: float | str | os.PathLike = 1.0,
                precision: str = "auto") -> dict[str, np.ndarray]:
        """Photo-z of (N, bands, H, W) ``images`` (numpy or torch, any float precision; bands in ``self.bands``'
        order, fluxes as in the training data, not dereddened) with per-galaxy SFD E(B-V) ``ebv`` (N,) where the
        network dereddens (``dereddens``; a scalar for all, 0 for images already corrected).

        Returns ``predict``'s catalogue columns as float32 arrays (N,): ``z_phot`` (pdf mean), ``z_mode``,
        ``z_median``, ``z_lo68``/``z_hi68``, ``z_lo95``/``z_hi95``, ``odds``, ``pdf_std``, and with ``pdf`` the
        (N, n_bins) float32 bin probabilities on ``grid`` (the catalogue stores them as float16). ``tta``: average
        over 1-4 exact 90-degree rotations; ``temperature``: a number or a ``calibration.json``; ``batch_size``:
        galaxies per forward pass (None: predict's default, 512 on a GPU, 64 on a CPU; 0 or less is an error);
        ``precision``: predict's ``--precision`` (auto: bf16 on GPUs with native bf16, fp32 on CPUs). The options
        are checked, and the network set up, by predict's own functions (``check_predict_options``,
        ``forward_setup``)."""
        what = f"the network {self.path}"
        if isinstance(temperature, (str, os.PathLike)):
            temperature = read_temperature(os.fspath(temperature))  # a number as text, or a calibration.json
        tta, t = check_predict_options(tta, temperature)
        images = arrays.check_images(images, self.survey, self.crop_size, what)
        ebv = arrays.check_ebv(ebv, len(images), self.dereddens, what)
        height, width = images.shape[2], images.shape[3]
        spec = arrays.eval_spec(self.config.augment, self.survey, height, width, self.grid, "the images")
        setup = forward_setup(self.net, self.config, self.device, precision, batch_size)
        log_p = arrays.photoz_log_probs(
            setup.net, spec, images, ebv, batch_size=setup.batch_size, device=self.device, tta=tta,
            autocast=setup.precision.autocast, channels_last=setup.channels_last)
        summary, probs = arrays.photoz_summaries(log_p, self.grid, t)
        if pdf:
            summary["pdf"] = probs.astype(np.float32)
        return summary


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               overrides: Mapping[str, Any] | Sequence[str] | None = None) -> PhotoZModel:
    """The photo-z network of ``path`` -- ``best_model.pt``, ``photoz_model.pt``, a fine-tuning checkpoint, a file of
    ``import-checkpoint``, or a directory of ``export-model`` -- on ``device`` (default: the GPU if any, else the
    CPU), with its config and ``overrides`` applied as predict applies its own (``photoz-hpc predict ...
    augment.crop_size=48`` is ``load_model(path, overrides={"augment.crop_size": 48})``). A MoCo checkpoint or
    ``encoder.pt`` has no redshift head: an error saying to fine-tune it."""
    path = Path(path)
    if not path.exists():
        raise PhotozError(f"{path} does not exist (a best_model.pt, photoz_model.pt, checkpoint or model directory)")
    device = arrays.pick_device(device)
    net, cfg, meta = load_network(path, override_list(overrides))  # predict's loader: file, checkpoint or directory
    return PhotoZModel(net, cfg, meta, path, device)


# ---------------------------------------------------------------------- encoders


class Encoder(_Views):
    """A pretrained encoder (``encoder.pt`` or a MoCo checkpoint) with the view it was trained on: ``embed`` gives
    ``photoz-hpc embed``'s vectors for arrays."""

    def __init__(self, path: Path, values: dict[str, Any], trunk: Embedder, device: torch.device,
                 overrides: list[str]) -> None:
        self.path, self.values, self.device = path, values, device
        self.config = embed_config(path, trunk, values, overrides)
        self._nets: dict[str, Embedder] = {"trunk": trunk}

    @property
    def survey(self) -> Survey:
        return self._nets["trunk"].survey

    def to(self, device: str | torch.device) -> Encoder:
        self.device = arrays.pick_device(device)
        return self

    def __repr__(self) -> str:
        return (f"Encoder({str(self.path)!r}: {self.config.model.arch}/{self.config.model.width}, bands "
                f"{''.join(self.bands)} ({self.survey.name}), crop {self.crop_size}, {self.device})")

    def network(self, feature: str = "projection") -> Embedder:
        """The ``Embedder`` of ``feature``: ``projection`` (the MoCo head's output, what embed writes by default) or
        ``trunk`` (the ResNet's pooled feature)."""
        if feature not in FEATURES:
            raise ValueError(f"feature '{feature}' is not one of {list(FEATURES)}")
        if feature not in self._nets:
            self._nets[feature], _ = load_embedder(self.path, feature)
        return self._nets[feature]

    def embed(self, images: Any, ebv: Any = None, *, feature: str = "projection", batch_size: int | None = None
              ) -> np.ndarray:
        """(N, dim) float32 L2-normalised embeddings of (N, bands, H, W) ``images`` (see ``PhotoZModel.predict`` for
        the layout and ``ebv``), on the eval view (the crop and dereddening the encoder was trained with):
        ``projection`` or ``trunk`` features. A dot product of two rows is their cosine similarity."""
        what = f"the encoder {self.path}"
        net = self.network(feature)
        images = arrays.check_images(images, self.survey, self.crop_size, what)
        ebv = arrays.check_ebv(ebv, len(images), self.dereddens, what)
        spec = arrays.eval_spec(self.config.augment, self.survey, images.shape[2], images.shape[3], None,
                                "the images")
        batch = resolve_batch_size(batch_size, self.config.loader.batch_size, "(loader.batch_size, as embed)")
        net = net.to(self.device).eval()
        autocast = resolve_precision(self.config.train.precision, self.device).autocast
        return arrays.embed_arrays(net, spec, images, ebv, batch_size=batch, device=self.device, autocast=autocast)


def load_encoder(path: str | os.PathLike, device: str | torch.device | None = None,
                 overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Encoder:
    """The encoder of an ``encoder.pt`` or a MoCo checkpoint, on ``device`` (default: the GPU if any, else the CPU),
    with its view settings (``overrides``: as ``embed``'s, e.g. ``{"augment.crop_size": 48}``)."""
    path = Path(path)
    trunk, values = load_embedder(path, "trunk")
    return Encoder(path, values, trunk, arrays.pick_device(device), override_list(overrides))


# ---------------------------------------------------------------------- similarity


def _embedding_set(embeddings: Any) -> Embeddings | np.ndarray:
    """An ``embed`` directory (a path or ``Embeddings``) as it is; an array (N, dim) as float32, checked."""
    if isinstance(embeddings, Embeddings):
        return embeddings
    if isinstance(embeddings, (str, os.PathLike)):
        return Embeddings(embeddings)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    db = np.asarray(embeddings)
    if db.ndim != 2 or db.dtype.kind not in "fiu":
        raise ValueError(f"embeddings must be an (N, dim) array of numbers (or an embed directory), got shape "
                         f"{tuple(db.shape)} and dtype {db.dtype}")
    db = np.ascontiguousarray(db, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(db).all(axis=1))
    if len(bad):
        raise ValueError(f"embeddings: {len(bad)} of {len(db)} rows have NaN or inf values (rows {bad[:10].tolist()})")
    return db


def search(embeddings: Any, queries: Any, k: int = 5, *, backend: str = "auto") -> dict[str, np.ndarray]:
    """The ``k`` most similar galaxies (dot product, exact) in ``embeddings`` ((N, dim) array or an ``embed``
    directory) to each query: row numbers of ``embeddings`` (1-d ints; a galaxy is never its own neighbour, as in
    ``photoz-hpc search``) or query vectors ((Q, dim) floats). Returns ``{"index": (Q, k) rows, "similarity":
    (Q, k)}``, best first."""
    db = _embedding_set(embeddings)
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().cpu().numpy()
    q = np.asarray(queries)
    if q.ndim <= 1 and q.dtype.kind in "iu":
        sims, rows = search_rows(db, np.atleast_1d(q), int(k), backend)
    elif q.ndim == 2 and q.dtype.kind in "fiu":
        dim = db.dim if isinstance(db, Embeddings) else db.shape[1]
        if q.shape[1] != dim:
            raise ValueError(f"query vectors have {q.shape[1]} dimensions, the embeddings {dim}")
        sims, rows = knn(db, np.ascontiguousarray(q, dtype=np.float32), int(k), backend=backend)
    else:
        raise ValueError(f"queries must be row numbers (1-d ints) or query vectors (Q, dim), got shape "
                         f"{tuple(q.shape)} and dtype {q.dtype}")
    return {"index": rows, "similarity": sims}


def anomalies(embeddings: Any, k: int = 10, *, backend: str = "auto") -> np.ndarray:
    """Anomaly score of every galaxy of ``embeddings`` ((N, dim) array or an ``embed`` directory), in row order:
    1 - mean similarity to its ``k`` nearest other galaxies (``photoz-hpc anomalies``' scores; high = unusual)."""
    return anomaly_scores(_embedding_set(embeddings), int(k), backend)


# ---------------------------------------------------------------------- fine-tuning and evaluation


def finetune(data: str | os.PathLike | None = None, *, init: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | Sequence[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """``photoz-hpc finetune [--config CONFIG] data.path=DATA finetune.init=INIT out_dir=OUT_DIR OVERRIDES`` from
    Python: trains, keeps the best network by validation sigma_MAD and evaluates it into ``OUT_DIR/eval``.
    Arguments left None keep the config's value (``init`` 'none': the supervised baseline). Returns (the run
    directory, the summary the command prints; ``summary['eval']['metrics']``). Run again with the same arguments:
    a finished run returns its summary (``already_finished``), an interrupted one resumes from its checkpoint.

    A stop request ends the run after a checkpoint (where the command would exit 130 or 75) and is raised, never
    returned as a summary without ``eval``: Ctrl-C (``KeyboardInterrupt``) or a pre-emption signal, SIGTERM or
    SIGUSR1 (``PhotozError``), each saying at which step it stopped and that the same call resumes."""
    from photoz_hpc.comm.devices import check_gpu_requests
    from photoz_hpc.launch.finetune_eval import finetune_and_evaluate

    named = {key: value for key, value in (("data.path", data), ("finetune.init", init), ("out_dir", out_dir))
             if value is not None}
    given = override_list(overrides)
    twice = sorted(k for k in named if any(o.split("=", 1)[0].strip() == k for o in given))
    if twice:
        raise ValueError(f"{', '.join(twice)} given both as an argument and in overrides: give each once")
    ov = override_list(named) + given
    check_gpu_requests(ov)  # as on a command line: a GPU asked for on a machine without one is an error
    cfg = load_config(config, ov, root=FinetuneRunConfig)
    summary = finetune_and_evaluate(cfg)
    if summary.get("preempted"):
        raise_stopped(summary)
    return Path(cfg.out_dir), summary


def raise_stopped(summary: dict[str, Any]) -> None:
    """Raise what a training run stopped by a signal (``summary['preempted']``) is in Python: ``KeyboardInterrupt``
    after Ctrl-C, ``PhotozError`` after a pre-emption signal; the message says where it stopped and how to resume."""
    step, ckpt = summary.get("steps"), summary.get("checkpoint")
    where = (f"stopped at step {step} after a checkpoint ({ckpt})" if ckpt
             else f"stopped at step {step}, before any checkpoint (nothing trained yet)")
    again = "call pz.finetune again with the same arguments to resume"
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"{where}; {again}")
    raise PhotozError(f"pz.finetune: a pre-emption signal (SIGTERM or SIGUSR1) {where}; {again}")


def evaluate_model(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None, *,
                   ids: str | os.PathLike | None = None,
                   overrides: Mapping[str, Any] | Sequence[str] | None = None) -> dict[str, Any]:
    """``photoz-hpc evaluate --checkpoint MODEL --data DATA [--out OUT] [--ids IDS] OVERRIDES`` from Python: metrics,
    predictions.csv and plots of a photo-z network on the labeled galaxies of a prepared dataset (``ids``: a .npy
    of dataset rows). Returns the report (``metrics``, ``n``, ``predictions``: the csv written, ``plots``)."""
    from photoz_hpc.comm.devices import check_gpu_requests

    ov = override_list(overrides)
    check_gpu_requests(ov)
    return run_evaluate(model, data, out, ids, ov)
