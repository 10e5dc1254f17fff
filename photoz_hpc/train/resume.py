"""A resume continues the *same* run: what determines its result must equal what the checkpoint was trained with.

``mismatch(saved_config, saved_datasets, config, datasets)`` lists every key on which a checkpoint's run and
this run's config differ, leaving out the keys of ``MAY_CHANGE``; the loop refuses a resume with any such key
(``train.loop.resume_state``). Without the check a resume with other data, another lr or another
``finetune.init`` silently continued the old weights under the new config's name.

Datasets (``data.path``, ``finetune.val_data``) are compared by content, not by path: the checkpoint carries
each dataset's identity (a hash of its manifest's shard checksums), so a dataset staged to node-local disk or
moved keeps resuming, and other data at the same path is refused. What the model records about its data (the
survey, the redshift grid: ``records_mismatch``) must be the same too, so a resume on another survey's data
names both surveys and their bands.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from photoz_hpc.models.records import GRID_KEY, SURVEY_KEY, default_survey
from photoz_hpc.survey import SDSS_GRID, survey_facts

#: Keys (or whole sections) that may differ on resume, and why: they change how the run is executed, logged,
#: checkpointed or how long it runs, never what a training step computes from which data.
MAY_CHANGE: dict[str, str] = {
    "out_dir": "where the run lives (a moved run directory; train.resume=PATH from another one)",
    "log_level": "logging",
    "train.epochs": "a longer run: the schedule is stretched to the new length from the resumed step on",
    "train.max_steps": "a longer run (as train.epochs)",
    "train.checkpoint_every": "checkpoint cadence",
    "train.keep_checkpoints": "checkpoint retention",
    "train.resume": "how the checkpoint is found",
    "train.log_every": "logging",
    "train.progress": "logging",
    "train.progress_every": "logging",
    "train.tensorboard": "logging",
    "train.export_encoder": "an output written at the end",
    "train.cpu_threads": "execution (threads), not the objective",
    "train.device": "execution (device), not the objective",
    "dist": "the communication backend and its timeouts",
    "loader.backend": "how batches are made (same augmentations)",
    "loader.device": "how batches are made",
    "loader.num_threads": "how batches are made",
    "loader.prefetch": "how batches are made",
    "loader.num_workers": "how batches are made",
    "loader.verify_records": "how batches are made",
    "loader.batch_size": "per rank, it goes with the world size, which may change too; the global batch (world x "
                         "batch_size: lr scaling, steps per epoch, schedule) may not (``global_batch_change``)",
    "model.channels_last": "memory format",
    "optim.fused": "an implementation of the same optimiser",
    "moco.split_bn_backward": "an implementation of the same backward",
    "finetune.eval_batch_size": "validation batching",
    "data.synth_n": "how the quickstart makes data.path (whose content is compared)",
    "data.synth_labeled": "how the quickstart makes data.path (whose content is compared)",
    "data.samples_per_shard": "how the quickstart makes data.path (whose content is compared)",
    "data.survey": "how the quickstart makes data.path (whose content, survey included, is compared)",
}

#: Dataset keys compared by content when both sides know it (``dataset_identity``), else by path.
DATASET_KEYS = ("data.path", "finetune.val_data")


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def dataset_identity(path: str) -> str | None:
    """A hash of a prepared dataset's shard list and checksums (None: no such dataset or no checksums)."""
    if not path:
        return None
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        shards = [(s["file"], s["count"], s["sha256"], s.get("meta_sha256")) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def dataset_identities(cfg) -> dict[str, str | None]:
    """The identity of each dataset ``cfg`` trains or validates on (saved with every checkpoint)."""
    values = flatten(dataclasses.asdict(cfg))
    return {key: dataset_identity(values[key]) for key in DATASET_KEYS if key in values}


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "finetune.init" and isinstance(old, str) and isinstance(new, str):
        if "none" in (old.lower(), new.lower()):
            return old.lower() == new.lower()
        return Path(old).resolve() == Path(new).resolve()  # relative or absolute, the same file
    return old == new


def global_batch_change(state: dict[str, Any], world: int, batch_size: int) -> str | None:
    """'loader.batch_size ...' when the checkpoint's global batch (its world x per-rank batch) differs from this
    run's: the per-rank batch may follow a new rank count, the global batch may not."""
    saved_world, saved_batch = state.get("world"), state.get("batch_size")
    if not isinstance(saved_world, int) or not isinstance(saved_batch, int):
        return None
    if saved_world * saved_batch == world * batch_size:
        return None
    return (f"loader.batch_size: global batch {saved_world} x {saved_batch} = {saved_world * saved_batch} -> "
            f"{world} x {batch_size} = {world * batch_size}")


def records_mismatch(state: dict[str, Any], records: dict[str, Any] | None) -> list[str]:
    """What the model of checkpoint ``state`` records about its data (survey, redshift grid; none recorded: SDSS
    and the paper's 180 bins) that differs from this run's ``records``, as 'key: old -> new' lines naming both."""
    diffs = []
    records = records or {}
    if SURVEY_KEY in records:
        old, new = state.get(SURVEY_KEY) or default_survey().to_dict(), records[SURVEY_KEY]
        old_facts, new_facts = survey_facts(old), survey_facts(new)
        if old_facts != new_facts:  # prose and sources may change; what the model computed from may not
            what = f"survey: '{old.get('name')}' bands {old.get('bands')} -> '{new.get('name')}' bands {new.get('bands')}"
            if (old.get("name"), old.get("bands")) == (new.get("name"), new.get("bands")):
                what += f" (it differs in {sorted(k for k in new_facts if old_facts[k] != new_facts[k])})"
            diffs.append(what)
    if GRID_KEY in records:
        old, new = state.get(GRID_KEY) or SDSS_GRID.to_dict(), records[GRID_KEY]
        if old != new:
            diffs.append(f"redshift grid: {old['n_bins']} bins over [{old['z_min']}, {old['z_max']}) -> "
                         f"{new['n_bins']} bins over [{new['z_min']}, {new['z_max']})")
    return diffs


def mismatch(saved: dict[str, Any], saved_datasets: dict[str, Any] | None, cfg,
             datasets: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(differences as 'key: old -> new', keys this code has but the checkpoint's config lacks)."""
    old, new = flatten(saved), flatten(dataclasses.asdict(cfg))
    saved_datasets = saved_datasets or {}
    diffs, unknown = [], []
    for key, value in new.items():
        if may_change(key):
            continue
        if key not in old:
            unknown.append(key)
            continue
        if key in DATASET_KEYS:
            a, b = saved_datasets.get(key), datasets.get(key)
            if a and b:  # both known by content: the path may differ, the data may not
                if a != b:
                    diffs.append(f"{key}: {old[key]!r} -> {value!r} (other data)")
                continue
        if not _same(key, old[key], value):
            diffs.append(f"{key}: {old[key]!r} -> {value!r}")
    return diffs, unknown
