"""Photo-z pdfs and embeddings of cutouts held in memory (numpy arrays or torch tensors), the way ``predict`` and
``embed`` compute them for a prepared store.

Why one module: the Python API (``photoz_hpc.launch.api``) predicts and embeds arrays, and its numbers must be the
commands' for the same galaxies. So the pieces are shared rather than copied: the eval view
(``augment.arrays.eval_views``: the loaders' centre crop and dereddening), the forward pass with test-time
augmentation (``train.inference.batch_log_probs``, also predict's), the pdf summaries (``photoz_summaries``, which
predict's catalogue parts are made of) and the embedding forward (``embeddings.embed_batch``, also embed's).

The checks come first, before any forward pass, and name the problem: images in another layout ((N, H, W, bands)
given), of other bands than the network's (its bands named), smaller than its crop, with NaN/inf pixels (the rows
named); E(B-V) missing where the network dereddens, of the wrong shape, or not finite. Floating-point images of any
precision (float16, float64, bfloat16 tensors) are read as float32, as a store holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from photoz_hpc.augment.arrays import eval_spec, eval_views
from photoz_hpc.augment.draws import AugmentSpec
from photoz_hpc.data.arrays import check_layout, check_real, finite_column, nonfinite_message, nonfinite_rows
from photoz_hpc.evaluate.calibration import softmax_log
from photoz_hpc.evaluate.embeddings import embed_batch
from photoz_hpc.evaluate.pdfs import summarize_catalogue
from photoz_hpc.logs import get_logger
from photoz_hpc.survey import RedshiftGrid, Survey
from photoz_hpc.train.inference import batch_log_probs

log = get_logger(__name__)

#: the per-galaxy pdf summaries of a catalogue row, in its column order (float32 each)
SUMMARIES = ("z_phot", "z_mode", "z_median", "z_lo68", "z_hi68", "z_lo95", "z_hi95", "odds", "pdf_std")


def photoz_summaries(log_p: np.ndarray, grid: RedshiftGrid, temperature: float = 1.0
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the ``SUMMARIES`` as float32 arrays, the float64 pdfs) of (N, n_bins) log-pdfs on ``grid``, at ``temperature``
    (logits / T, ``calibration.softmax_log``): what a catalogue row holds (``catalogue.part_columns``)."""
    probs = softmax_log(log_p, temperature)
    summary = summarize_catalogue(probs, grid)
    return {k: np.ascontiguousarray(summary[k], dtype=np.float32) for k in SUMMARIES}, probs


# ---------------------------------------------------------------------- checks


def check_images(images: Any, survey: Survey, crop: int | None, what: str) -> np.ndarray | torch.Tensor:
    """``images`` as a numpy array or tensor of shape (N, bands, H, W) in ``survey``'s band order (the network's,
    named ``what`` in errors), checked (``data.arrays.check_layout``: the layout, the band count, at least ``crop``
    pixels a side; real numbers; no NaN/inf pixel). Not copied: batches are read as float32 when used (``batches``)."""
    if isinstance(images, torch.Tensor):
        if images.dtype.is_complex or images.dtype == torch.bool:
            raise ValueError(f"images have dtype {images.dtype}: pass real numbers (fluxes; they are read as float32)")
    else:
        images = np.asarray(images)
        check_real(images.dtype)
    check_layout(tuple(images.shape), survey, crop, what)
    bad_rows = nonfinite_rows(images)
    if len(bad_rows):
        raise ValueError(nonfinite_message(bad_rows, len(images)))
    return images


def check_ebv(ebv: Any, n: int, deredden: bool, what: str) -> np.ndarray | None:
    """Per-galaxy SFD E(B-V) as float64 (n,) where ``deredden`` (a scalar stands for every galaxy, e.g. 0 for
    images already corrected), None where not (a given ``ebv`` is then unused, with a WARNING)."""
    if not deredden:
        if ebv is not None:
            log.warning("%s does not deredden its inputs (augment.deredden=false, as trained): ebv is not used", what)
        return None
    if ebv is None:
        raise ValueError(f"{what} dereddens its inputs by each galaxy's SFD E(B-V) (augment.deredden=true, as "
                         f"trained): pass ebv= one value per galaxy, shape ({n},), or ebv=0 for images already "
                         "corrected for Galactic extinction")
    return finite_column(ebv, n, "ebv")  # prepare_arrays' check of the same column


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, or the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but no CUDA device is available: use device='cpu'")
    return device


# ---------------------------------------------------------------------- inference


def batches(images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device
            ) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, (B, C, H, W) float32 tensor on ``device``) per batch of ``batch_size`` galaxies, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    for lo in range(0, len(images), batch_size):
        rows = slice(lo, min(lo + batch_size, len(images)))
        chunk = images[rows]
        if isinstance(chunk, torch.Tensor):
            x = chunk.to(device=device, dtype=torch.float32)
        else:
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        yield rows, x


def photoz_log_probs(net, spec: AugmentSpec, images: np.ndarray | torch.Tensor, ebv: np.ndarray | None, *,
                     batch_size: int, device: torch.device, tta: int = 1, autocast=None,
                     channels_last: bool = False) -> np.ndarray:
    """(N, n_bins) float32 log-pdfs of checked ``images`` (``check_images``) on the eval view ``spec`` with E(B-V)
    ``ebv`` (``check_ebv``): per batch the eval view, then ``batch_log_probs`` as predict runs it (``net`` on
    ``device``, eval mode, in ``channels_last`` when so)."""
    out = []
    for rows, x in batches(images, batch_size, device):
        view = eval_views(x, None if ebv is None else ebv[rows], spec)
        out.append(batch_log_probs(net, view, tta, autocast, channels_last).cpu().numpy())
    return np.concatenate(out)


def embed_arrays(net, spec: AugmentSpec, images: np.ndarray | torch.Tensor, ebv: np.ndarray | None, *,
                 batch_size: int, device: torch.device, autocast) -> np.ndarray:
    """(N, dim) float32 L2-normalised embeddings of checked ``images`` by ``net`` (an ``Embedder`` on ``device``) on
    the eval view ``spec``: per batch the eval view, then ``embed_batch`` as embed runs it."""
    out = []
    for rows, x in batches(images, batch_size, device):
        view = eval_views(x, None if ebv is None else ebv[rows], spec)
        out.append(embed_batch(net, view, autocast).cpu().numpy())
    return np.concatenate(out)

__all__ = ["batches", "check_ebv", "check_images", "embed_arrays", "eval_spec", "photoz_log_probs", "photoz_summaries",
           "pick_device"]
