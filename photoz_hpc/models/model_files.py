"""The exported model directory: a photo-z network anyone can load with photoz-hpc alone, and check first.

Why: a ``.pt`` file is a pickle (read safely here, but not everywhere) and says nothing a reader can see about what
the network is for. ``photoz-hpc export-model`` writes a directory instead::

    model.safetensors   the weights (safetensors: a JSON header and raw tensors, no code, no pickle)
    model_card.json     what the network is: architecture, survey (bands), redshift grid, training data, metrics
    README.md           the same card for people
    checksums.sha256    sha256sum lines of the three files above (``sha256sum -c checksums.sha256`` checks them)

``load_model_dir`` verifies every checksum before it uses anything (a mismatch or a missing file is a
``PhotozError`` naming the file), builds the network from the card (the stem for the recorded bands, the head for
the recorded grid) and loads the weights with ``strict`` key and shape checks: the same ``PhotoZNet``, bit for bit,
as the file it was exported from. Each file is read once: the card and the weights are parsed from the very bytes
whose checksum was checked (no check-then-read-again window). ``load_photoz`` takes either form: a directory or a photo-z model file.
The directory is written whole or not at all (built in a temporary sibling, then renamed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from photoz_hpc.errors import PhotozError
from photoz_hpc.io_utils import sha256_file
from photoz_hpc.models.photoz_net import PhotoZNet, load_photoz_model
from photoz_hpc.models.resnet import build_encoder
from photoz_hpc.survey import RedshiftGrid, survey_from_dict
from photoz_hpc.version import __version__

MODEL_DIR_FORMAT = "photoz-hpc/model-dir/1"
WEIGHTS = "model.safetensors"
CARD = "model_card.json"
README = "README.md"
CHECKSUMS = "checksums.sha256"
#: The files a model directory must hold (each listed in ``CHECKSUMS``).
REQUIRED = (WEIGHTS, CARD, README)
#: The project's licence, as its LICENSE file names it (recorded in every card).
LICENSE = "MIT License"
NOT_RECORDED = "not recorded"


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory meant as an exported model (it has a card or a checksum list)."""
    p = Path(path)
    return p.is_dir() and ((p / CARD).exists() or (p / CHECKSUMS).exists())


# ---------------------------------------------------------------------- writing


def write_model_dir(net: PhotoZNet, model_cfg: Any, out_dir: str | os.PathLike, card: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``net`` (its weights, survey and grid; ``model_cfg``: its ``ModelConfig`` or dict) and the card entries
    ``card`` (training data, metrics, source, the training config...) as a model directory at ``out_dir``.
    An existing non-empty ``out_dir`` is refused unless ``overwrite``; nothing is left half-written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PhotozError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PhotozError(f"{out} exists and is not empty: choose a new directory, or pass --overwrite to replace it")
    cfg = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    full = {**model_card(net, cfg, state, out.name), **(card or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": MODEL_DIR_FORMAT, "card": CARD})
        (tmp / CARD).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        (tmp / README).write_text(render_readme(full), encoding="utf-8")
        (tmp / CHECKSUMS).write_text("".join(f"{sha256_file(tmp / name)}  {name}\n" for name in REQUIRED),
                                     encoding="utf-8")
        for name in (*REQUIRED, CHECKSUMS):
            _fsync(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared model is readable like any directory
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(net: PhotoZNet, model_cfg: dict[str, Any], state: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The card entries every model directory has, read from the network itself (what loading needs)."""
    survey, grid = net.survey, net.grid
    n_params = sum(int(p.numel()) for p in net.parameters())
    return {
        "format": MODEL_DIR_FORMAT,
        "name": name,
        "kind": "photo-z network (PhotoZNet: ResNet trunk, global average pool, linear head over the redshift grid)",
        "architecture": {"network": "PhotoZNet", "arch": model_cfg.get("arch"), "width": model_cfg.get("width"),
                         "stem_kernel": model_cfg.get("stem_kernel"), "input_bands": survey.n_bands,
                         "feature_dim": int(net.encoder.feature_dim), "n_bins": grid.n_bins, "n_parameters": n_params},
        "model": model_cfg,
        "n_bins": grid.n_bins,
        "bands": list(survey.bands),
        "survey": survey.to_dict(),
        "redshift_grid": grid.to_dict(),
        "weights": {"file": WEIGHTS, "n_tensors": len(state),
                    "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})},
        "photoz_hpc_version": __version__,
        "license": LICENSE,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (empty, or replaced by ``--overwrite``) is moved
    aside first and removed only once the new directory is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous directory back
            with contextlib.suppress(OSError):
                os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- reading


def read_file(path: str | os.PathLike, what: str) -> tuple[bytes, str]:
    """(the bytes of ``path``, their sha256): read once, so what is parsed is what was hashed (a file replaced
    meanwhile cannot be checked in one version and used in another). Missing or unreadable: a ``PhotozError``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PhotozError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise PhotozError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    return data, hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class VerifiedDir:
    """A model directory checked against its ``checksums.sha256``: ``files`` {name: sha256}, ``data`` the bytes of
    the files asked for (exactly the bytes hashed), ``digest`` the sha256 of the checksum list (``model_digest``)."""

    root: Path
    files: dict[str, str]
    data: dict[str, bytes]
    digest: str


def _verified(path: str | os.PathLike, keep: tuple[str, ...] = ()) -> VerifiedDir:
    """Check every file the checksum list names (and that it names the files a model needs), reading each once;
    the bytes of the files in ``keep`` are returned for parsing. A missing, unlisted or changed file is a
    ``PhotozError`` naming it."""
    root = Path(path)
    if not root.is_dir():
        raise PhotozError(f"{root} is not a model directory (photoz-hpc export-model writes one)")
    listing = root / CHECKSUMS
    if not listing.is_file():
        raise PhotozError(f"{listing} is missing: {root} is not a complete exported model directory")
    raw, digest = read_file(listing, "checksum list")
    expected: dict[str, str] = {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PhotozError(f"{listing} is not a text file of '<sha256>  <file name>' lines") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        sha, sep, name = line.partition("  ")
        name = name.removeprefix("*")
        if not sep or len(sha) != 64 or not name or Path(name).name != name:
            raise PhotozError(f"{listing}: line {number} is not '<sha256>  <file name>': {line!r}")
        expected[name] = sha.lower()
    for name in REQUIRED:
        if name not in expected:
            raise PhotozError(f"{listing} does not list {name}: {root} is not a complete exported model directory")
    data: dict[str, bytes] = {}
    for name, sha in expected.items():
        file = root / name
        if not file.is_file():
            raise PhotozError(f"{file} is missing (listed in {listing})")
        if name in keep:
            data[name], found = read_file(file, "model file")
        else:
            found = sha256_file(file)  # only checked: streamed, not held
        if found != sha:
            raise PhotozError(f"{file} does not match its checksum in {listing}: the file is damaged or was changed "
                              "after export")
    return VerifiedDir(root, expected, data, digest)


def verify_model_dir(path: str | os.PathLike) -> dict[str, str]:
    """Check every file ``checksums.sha256`` lists (and that it lists the files a model needs) before anything is
    read; returns {file: sha256}. A missing, unlisted or changed file is a ``PhotozError`` naming it."""
    return _verified(path).files


def _parse_card(raw: bytes, where: Path) -> dict[str, Any]:
    """The card from the verified bytes of ``model_card.json``."""
    try:
        card = json.loads(raw)
    except ValueError as exc:
        raise PhotozError(f"{where} is not readable JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_DIR_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise PhotozError(f"{where}: format {found!r}, expected {MODEL_DIR_FORMAT!r}")
    for key in ("model", "survey", "redshift_grid", "n_bins"):
        if key not in card:
            raise PhotozError(f"{where} has no '{key}': a model card records the architecture, survey and grid")
    return card


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a model directory, checksums verified first (parsed from the bytes that were checked)."""
    checked = _verified(path, keep=(CARD,))
    return _parse_card(checked.data[CARD], checked.root / CARD)


def read_model_dir(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[PhotoZNet, dict[str, Any], str]:
    """(network in eval mode on ``map_location``, its card, ``model_digest`` of the directory) of an exported model
    directory: every checksum first, then the card (architecture, survey, grid) and the safetensors weights parsed
    from the very bytes that were checked (each file read once); no pickle, no code from the directory runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    checked = _verified(path, keep=(CARD, WEIGHTS))
    root = checked.root
    card = _parse_card(checked.data[CARD], root / CARD)
    where = str(root / CARD)
    survey = survey_from_dict(card["survey"], f"{where}: 'survey'")
    grid = RedshiftGrid.from_dict(card["redshift_grid"], f"{where}: 'redshift_grid'")
    if int(card["n_bins"]) != grid.n_bins:
        raise PhotozError(f"{where}: n_bins {card['n_bins']} but a redshift grid of {grid.n_bins} bins")
    try:
        net = PhotoZNet(build_encoder(SimpleNamespace(**card["model"]), survey=survey), grid)
    except (TypeError, AttributeError) as exc:
        raise PhotozError(f"{where}: 'model' {card['model']!r} is not a model configuration ({exc})") from None
    try:
        state = load_safetensors(checked.data.pop(WEIGHTS))
    except (SafetensorError, ValueError) as exc:
        raise PhotozError(f"{root / WEIGHTS} is not a readable safetensors file ({exc})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise PhotozError(f"{root / WEIGHTS}: the weights do not fit the {card['model'].get('arch')} network for bands "
                          f"{list(survey.bands)} and {grid.n_bins} redshift bins that {CARD} describes ({exc})") from None
    return net.eval().to(map_location), card, checked.digest


def load_model_dir(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[PhotoZNet, dict]:
    """(network in eval mode on ``map_location``, its card) of an exported model directory (``read_model_dir``)."""
    net, card, _ = read_model_dir(path, map_location)
    return net, card


def load_photoz(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[PhotoZNet, dict]:
    """(network in eval mode, its metadata) of an exported model directory (``load_model_dir``: the card) or a
    photo-z model file (``load_photoz_model``: the file's dict). The metadata has ``model``, ``survey``,
    ``redshift_grid``, ``n_bins`` and, when recorded, the training ``config`` either way."""
    if Path(path).is_dir():
        return load_model_dir(path, map_location)
    net, blob = load_photoz_model(path, map_location)
    return net.to(map_location), blob


def model_digest(path: str | os.PathLike) -> str:
    """A sha256 naming a photo-z model's content: the file's, or for a model directory (checked first) that of its
    ``checksums.sha256``, which holds every file's sha256 (what a catalogue plan and an evaluation's metrics.json
    record as ``checkpoint_sha256``). A loader that already read the model has it for free (``read_model_dir``,
    ``evaluate.run.load_network``'s ``meta['checkpoint_sha256']``): the digest of the bytes it used."""
    p = Path(path)
    if p.is_dir():
        return _verified(p).digest
    return sha256_file(p)


# ---------------------------------------------------------------------- the README


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return NOT_RECORDED if value is None else str(value)


def _metrics_row(m: dict[str, Any]) -> str:
    return (f"{_num(m.get('sigma_mad'))} | {_pct(m.get('eta'))} | {_num(m.get('bias'))} | "
            f"{_pct(m.get('outlier_rate_lsst'))} | {_num(m.get('n'))}")


def _pct(value: Any) -> str:
    return f"{100 * value:.3g}%" if isinstance(value, (int, float)) else NOT_RECORDED


def render_readme(card: dict[str, Any]) -> str:
    """README.md of a model directory: the card for people (``model_card.json`` is the same for programs)."""
    a, g, s = card["architecture"], card["redshift_grid"], card["survey"]
    name = card.get("name") or "model"
    lines = [f"# {name}: a photoz-hpc photo-z network", "",
             f"Photometric-redshift network for **{s.get('name')}** cutouts in the bands "
             f"**{' '.join(card['bands'])}** (in this channel order), predicting a redshift pdf over "
             f"{g['n_bins']} equal bins on [{g['z_min']:g}, {g['z_max']:g}).", "",
             "## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_num(a.get(k))} |" for k in ("network", "arch", "width", "stem_kernel", "input_bands",
                                                        "feature_dim", "n_bins", "n_parameters")]
    inp = card.get("input") or {}
    lines += ["", "## Input", "",
              f"- survey `{s.get('name')}`: bands {', '.join(card['bands'])}; pixel scale {_num(s.get('pixel_scale'))}\"; "
              f"cutouts {_num(s.get('cutout_size'))} px; flux unit {s.get('flux_unit')} (the full description is "
              "`survey` in model_card.json)",
              f"- evaluation view: centre crop {_num(inp.get('crop_size'))} px, dereddened: {_num(inp.get('deredden'))}",
              f"- redshift grid: {g['n_bins']} bins over [{g['z_min']:g}, {g['z_max']:g}); z_phot is the pdf's "
              "expectation over bin centres", ""]
    lines += ["## Training data", ""]
    training = card.get("training") or {}
    lines += [f"- {k}: {_num(v) if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in training.items()] \
        or [f"- {NOT_RECORDED}"]
    metrics = card.get("metrics") or {}
    header = ["| set | sigma_MAD | eta | bias | outlier rate (LSST) | n |", "|---|---|---|---|---|---|"]
    lines += ["", "## Metrics", ""]
    val = metrics.get("validation")
    if isinstance(val, dict):
        lines += [*header, f"| validation ({val.get('source', '')}) | {_metrics_row(val.get('metrics') or {})} |", "",
                  f"Validation: {val.get('dataset', NOT_RECORDED)}, produced by `{val.get('command', NOT_RECORDED)}`."]
    else:
        lines += [f"Validation metrics: {NOT_RECORDED}."]
    tests = metrics.get("test")
    if isinstance(tests, list) and tests:
        lines += ["", *header]
        lines += [f"| {Path(str(t.get('dataset'))).name} | {_metrics_row(t.get('metrics') or {})} |" for t in tests]
        lines += [""]
        for t in tests:
            lines.append(f"- {t.get('dataset')}: `{t.get('command')}`")
            if t.get("n_training_galaxies"):
                lines.append(f"  ({t['n_training_galaxies']} of these galaxies trained the network: optimistic)")
    else:
        lines += ["", f"Test metrics: {NOT_RECORDED}."]
    excluded = metrics.get("excluded")
    if isinstance(excluded, list) and excluded:
        lines += ["", "Left out (metrics of the file's path, but not shown to be of these weights):", ""]
        lines += [f"- {e.get('set')}: {e.get('file')}: {e.get('why')}" for e in excluded if isinstance(e, dict)]
    src = card.get("source") or {}
    lines += ["", "## Source", ""] + [f"- {k}: {_num(v) if not isinstance(v, (dict, list)) else json.dumps(v)}"
                                      for k, v in src.items()]
    lines += ["", "## Loading", "",
              "With photoz-hpc installed (`pip install .` or `bash launch/setup_env.sh` in a photoz-hpc checkout); "
              "every load verifies `checksums.sha256` first:", "", "```python",
              "from photoz_hpc.models.model_files import load_model_dir",
              f"net, card = load_model_dir(\"{name}\")   # PhotoZNet in eval mode; card = model_card.json",
              "probs = net(images).softmax(-1)          # images: (N, "
              f"{a['input_bands']}, S, S) float32, the evaluation view above",
              "z_phot = net.point_estimate(probs, net.z_centres)", "```", "",
              "or through torch.hub from a photoz-hpc checkout (its `hubconf.py`):", "", "```python", "import torch",
              f"net = torch.hub.load(\"path/to/photoz-hpc\", \"photoz_model\", path=\"{name}\", source=\"local\")",
              "```", "",
              "photoz-hpc commands that take a photo-z model file (`evaluate --checkpoint`, `predict`, `calibrate`) take "
              "this directory too.", "",
              "## Files", "", f"- `{WEIGHTS}`: the weights (safetensors: no pickle, no code)",
              f"- `{CARD}`: this card for programs (architecture, survey, grid, training config, metrics)",
              f"- `{README}`: this file", f"- `{CHECKSUMS}`: `sha256sum -c {CHECKSUMS}` checks the files above", "",
              f"photoz-hpc {card.get('photoz_hpc_version')}, exported {card.get('date')}. Licence: "
              f"{card.get('license')}.", ""]
    return "\n".join(lines)
