"""The docs are true by construction: every command line and Python block of README.md and docs/*.md is
checked against the code, so a renamed command, flag, config key, path or CSV column fails here.

What is checked (CPU only, about ten seconds):

* Every ``photoz-hpc ...`` line of a fenced code block (``\\`` continuations joined, ``# comments`` dropped,
  ``for V in A B; do ... done`` expanded, ``$VARS`` set to ``0``) parses with the real parser
  (``photoz_hpc.cli.build_parser``), and its config is validated as the command would: ``--config`` files
  and ``key=value`` overrides through ``load_config`` (pretrain, finetune), sweep files through
  ``load_sweep``/``task_configs``, the quickstart's overrides through its router, other commands' overrides
  against the config sections. Usage notation is read as a reader would: ``[...]`` is optional and checked
  with its contents, ``a|b`` takes the first choice, ``...`` and the ``key=value`` placeholder are dropped,
  and the placeholders of ``PLACEHOLDERS`` (``N``, ``K``, ``ID``...) get sample values. Only the blocks
  marked ``run`` (below) are run: the others train for hours, submit jobs or need data.
* A shell block marked ``run`` is executed, in order, in a copy of the Python blocks' scratch directory
  (with ``configs/`` linked in): each ``photoz-hpc`` command (read as above) as ``python -m photoz_hpc`` with
  ``PYTHONPATH`` = the repository and ``OMP_NUM_THREADS=1``, any other command by ``bash -e -c``; each must exit
  0 and leave the outputs it names (``--out``, ``--json``, ``out_dir=``, an export's last argument).
* Every ``configs/``, ``slurm/``, ``launch/`` and ``benchmarks/`` path named in a shell block exists (unless
  the block makes it with ``cp``).
* Every Python block compiles, and runs in a scratch directory holding a tiny prepared dataset at
  ``data/quickstart``, a tiny ``runs/pretrain/encoder.pt`` and the names the prose defines (``cfg``,
  ``images``, ...; see ``_namespace``).
* The CSV columns that docs/similarity.md lists are the ones ``search`` and ``anomalies`` write.

A block is scaled down or skipped by an HTML comment (invisible on GitHub) on the line just above its fence:
``<!-- doc-test: sub OLD => NEW; OLD2 => NEW2 -->`` replaces text before running (e.g. ``n=10_000 => n=4``),
``<!-- doc-test: skip REASON -->`` keeps a Python block to compiling (a block that needs data not shipped,
a GPU, or hours), ``<!-- doc-test: continue -->`` (or ``continue; sub ...``) runs a Python block after the one
before it in the same namespace (a notebook page's cells, e.g. docs/python_api.md), ``<!-- doc-test: run -->`` runs a shell block, and ``<!-- doc-test: run; sub OLD => NEW -->``
scales it down first (e.g. ``--n 5000 => --n 32``, tiny-model overrides after ``out_dir=...``). The mechanism is described for doc writers in docs/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset, tiny_overrides

from photoz_hpc.cli import build_parser
from photoz_hpc.config import ROOTS, Config, FinetuneRunConfig, apply_overrides, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: sample values of the usage placeholders (an int where the option takes one)
PLACEHOLDERS = {"N": "1", "K": "2", "ID": "3", "I/N": "1/2"}
_MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _marker(body: str) -> dict[str, str]:
    """``run``, ``run; sub SPEC``, ``continue``, ``continue; sub SPEC``, ``sub SPEC`` or ``skip REASON`` as
    {'run': '', 'sub': SPEC}, {'continue': ''}, {'skip': REASON}."""
    mark = {}
    lead = re.match(r"(run|continue)\b\s*(?:;\s*)?(.*)$", body)
    if lead:
        mark[lead.group(1)], body = "", lead.group(2)
    word = re.match(r"(\w+)\s*(.*)$", body)
    if word:
        mark[word.group(1)] = word.group(2)
    return mark


def _blocks() -> list[tuple[str, str, str, dict[str, str]]]:
    """(where, language, text, marker) for every fenced block; marker: see ``_marker``."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = _MARKER.search(before)
            out.append((f"{path.relative_to(REPO)}:{line}", m.group(1), m.group(2),
                        _marker(mark.group(1)) if mark else {}))
    return out


BLOCKS = _blocks()
SHELL = [b for b in BLOCKS if b[1] in ("", "bash", "sh", "console")]
PYTHON = [b for b in BLOCKS if b[1] == "python"]


def _chains(blocks: list[tuple[str, str, str, dict[str, str]]]) -> list[list[tuple[str, str, dict[str, str]]]]:
    """Python blocks as runs of one namespace: a block marked ``continue`` joins the previous block's (a notebook
    page's cells, in order); every other block starts its own."""
    chains: list[list[tuple[str, str, dict[str, str]]]] = []
    for where, _, text, mark in blocks:
        if "continue" in mark and chains:
            chains[-1].append((where, text, mark))
        else:
            chains.append([(where, text, mark)])
    return chains


CHAINS = _chains(PYTHON)
RUN = [(where, text, mark) for where, _, text, mark in SHELL if "run" in mark]


def _substitute(text: str, spec: str) -> str:
    for pair in filter(None, (p.strip() for p in spec.split(";"))):
        old, new = (s.strip() for s in pair.split("=>"))
        assert old in text, f"doc-test sub: {old!r} is not in the block"
        text = text.replace(old, new)
    return text


def _logical_lines(block: str) -> list[str]:
    """Lines with continuations joined, comments dropped and ``for V in ...; do ... done`` expanded."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    out: list[str] = []
    loop: tuple[str, list[str], list[str]] | None = None
    for line in filter(None, lines):
        m = re.match(r"for (\w+) in ([^;]+); do\s*(.*?)\s*(?:;\s*)?(done)?$", line)
        if m:
            var, values, body, done = m.group(1), m.group(2).split(), m.group(3), m.group(4)
            loop = (var, values, [body] if body else [])
            if not done:
                continue
        elif loop is not None and line != "done":
            loop[2].append(line)
            continue
        if loop is not None:
            var, values, body = loop
            out += [re.sub(rf"\${{?{var}}}?", v, b) for v in values for b in body]
            loop = None
            continue
        out.append(line)
    return [re.sub(r"\$\{?\w+\}?", "0", line) for line in out]


def _commands(block: str) -> list[tuple[str, list[str] | None]]:
    """Each command of a shell block: (its text, its ``photoz-hpc`` arguments or None for another command)."""
    commands = []
    for line in _logical_lines(block):
        line = re.sub(r"\s{2,}\(alias: \w+\)$", "", line)  # a remark after the usage
        for part in filter(None, re.split(r"\s*(?:;|&&|\|\|)\s*", line)):
            m = re.match(r"^(?:\w+=\S+\s+)*(?:photoz-hpc|python -m photoz_hpc)(?:\s+(.*))?$", part)
            commands.append((part, _usage_to_args(m.group(1) or "") if m else None))
    return commands


def _photoz_commands(block: str) -> list[list[str]]:
    """The argument lists of the ``photoz-hpc`` (or ``python -m photoz_hpc``) commands of a shell block."""
    return [args for _, args in _commands(block) if args is not None]


def _usage_to_args(text: str) -> list[str]:
    args = []
    for tok in shlex.split(text.replace("[", " ").replace("]", " ")):
        if tok in ("...", "key=value") or tok.endswith("..."):
            continue
        tok = PLACEHOLDERS.get(tok, tok)
        if "|" in tok:
            tok = tok.split("|")[0]
        args.append(tok)
    return args


def _parse(args: list[str]) -> argparse.Namespace | None:
    """The real parser's reading of ``args`` (None for --help/--version); a parse error fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:
            return None
        raise AssertionError(f"photoz-hpc {' '.join(args)}: {err.getvalue().strip()}") from None


def _config_file(value: str | None) -> str | None:
    return None if value is None or Path(value).suffix not in (".yaml", ".yml") else value


def _validate_config(args: argparse.Namespace) -> None:
    """What the command would do with its config before touching data."""
    from photoz_hpc.launch.quickstart import split_overrides
    from photoz_hpc.launch.sweep import load_sweep, task_configs

    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "sweep", None):
        sweep = load_sweep(args.sweep)
        assert task_configs(sweep)
    elif args.command in ROOTS:
        load_config(_config_file(args.config), overrides, root=ROOTS[args.command])
    elif args.command in ("quickstart", "demo"):
        split_overrides(overrides)
    elif overrides:  # evaluation commands: keys of the sections a checkpoint's config has
        errors = []
        for root in (Config, FinetuneRunConfig):
            try:
                config_from_dict(apply_overrides({}, overrides, root), root)
                return
            except Exception as exc:  # noqa: BLE001 - collected into the failure message
                errors.append(str(exc))
        raise AssertionError(f"{args.command} overrides {overrides}: {errors}")


DOC_COMMANDS = [(where, args) for where, _, text, _ in SHELL for args in _photoz_commands(text)]


def test_the_docs_have_commands_to_check():
    assert len(DOC_COMMANDS) > 50 and len(PYTHON) >= 4
    assert {"pretrain", "finetune", "predict", "embed", "sweep-plan"} <= {a[0] for _, a in DOC_COMMANDS if a}
    assert len(RUN) >= 3


@pytest.mark.parametrize("where, args", DOC_COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in DOC_COMMANDS])
def test_every_documented_command_line_parses_and_its_config_validates(where, args, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository root
    parsed = _parse(args)
    if parsed is not None:
        _validate_config(parsed)


@pytest.mark.parametrize("where, text", [(w, t) for w, _, t, _ in SHELL], ids=[w for w, *_ in SHELL])
def test_repository_paths_in_shell_blocks_exist(where, text):
    made = set(re.findall(r"\bcp\s+\S+\s+(\S+)", text))  # a file the block itself creates
    for path in re.findall(r"(?<![\w/.$])((?:configs|slurm|launch|benchmarks)/[\w./-]+)", text):
        path = path.rstrip(".")
        if "*" in path or path.endswith("/") or path in made:
            continue
        assert (REPO / path).exists(), f"{where}: {path} does not exist"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch directory with what the Python blocks read: data/quickstart, runs/pretrain/encoder.pt and an exported
    photo-z model directory models/sdss_photoz."""
    from photoz_hpc.models.export import export_moco_encoder
    from photoz_hpc.models.moco import build_moco

    root = tmp_path_factory.mktemp("docs")
    data = make_dataset(root / "made", n=32, size=24)
    (root / "data").mkdir()
    data.rename(root / "data" / "quickstart")
    cfg = load_config(None, tiny_overrides(root / "data" / "quickstart", root / "runs" / "x", 8, 16,
                                           ("train.epochs=1",)))
    (root / "runs" / "pretrain").mkdir(parents=True)
    export_moco_encoder(build_moco(cfg), cfg.model, root / "runs" / "pretrain" / "encoder.pt",
                        augment_cfg=cfg.augment)  # as pretrain exports it: trunk, projection head, view settings
    from photoz_hpc.models.photoz_net import build_photoz_net, save_photoz_model
    from photoz_hpc.train.model_export import export_model

    save_photoz_model(build_photoz_net(cfg.model), cfg.model, root / "made" / "photoz_model.pt")
    export_model(root / "made" / "photoz_model.pt", root / "models" / "sdss_photoz")  # model_files.md's directory
    return root, cfg


def _namespace(cfg) -> dict:
    """The names the prose around the Python blocks defines."""
    return {"cfg": cfg, "dataset_or_path": "data/quickstart", "rank": 0, "world": 1, "start_epoch": 0, "k": 0,
            "images": np.random.default_rng(0).normal(size=(2, 5, 16, 16)).astype(np.float32)}


@pytest.mark.parametrize("chain", CHAINS, ids=[chain[0][0] for chain in CHAINS])
def test_python_blocks_compile_and_run_on_tiny_data(chain, workspace, monkeypatch):
    """Each block (with the ``continue`` blocks after it, in one namespace, as a notebook runs its cells)."""
    root, cfg = workspace
    monkeypatch.chdir(root)
    namespace = _namespace(cfg)
    for where, text, mark in chain:
        assert "continue" not in mark or where.rsplit(":", 1)[0] == chain[0][0].rsplit(":", 1)[0], \
            f"{where}: a doc-test continue block continues a block of its own page"
        code = compile(text, where, "exec")
        if "skip" in mark:
            assert mark["skip"], f"{where}: a doc-test skip needs a reason"
            continue
        if "sub" in mark:
            code = compile(_substitute(text, mark["sub"]), where, "exec")
        exec(code, namespace)  # noqa: S102 - the docs' own examples


def test_similarity_doc_lists_the_csv_columns_the_commands_write():
    import inspect

    from photoz_hpc.evaluate import similarity_cli

    doc = (REPO / "docs" / "similarity.md").read_text()
    source = inspect.getsource(similarity_cli)
    for name in ("search.csv", "anomaly_scores.csv", "top.csv"):
        written = re.search(rf'"{re.escape(name)}", (\[[^\]]*\])', source)
        assert written, f"similarity_cli writes {name} with an inline header"
        header = ",".join(eval(written.group(1)))  # noqa: S307 - a list literal of the module's own source
        assert f"`{header}`" in doc, f"docs/similarity.md does not list {name}'s columns {header}"


def _outputs(args: list[str]) -> list[str]:
    """The paths a ``photoz-hpc`` command names as its outputs: ``--out`` and the ``out_dir=`` override."""
    outs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--json")]
    outs += [a.split("=", 1)[1] for a in args if a.startswith("out_dir=")]
    if args and args[0] in ("export-encoder", "export-model", "export-qp", "resave", "import-checkpoint"):
        outs.append(args[-1])
    return outs


@pytest.mark.parametrize("where, text, mark", RUN, ids=[w for w, *_ in RUN])
def test_marked_shell_blocks_run_on_tiny_data(where, text, mark, workspace, tmp_path):
    """A ``run`` block's commands, in order, in a copy of the Python blocks' scratch directory."""
    root, _ = workspace
    scratch = tmp_path / "scratch"
    shutil.copytree(root, scratch)
    (scratch / "configs").symlink_to(REPO / "configs")  # the docs' --config paths, read only
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for part, args in _commands(_substitute(text, mark["sub"]) if "sub" in mark else text):
        command = [sys.executable, "-m", "photoz_hpc", *args] if args is not None else ["bash", "-e", "-c", part]
        done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{where}: {part} exited {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        for out in _outputs(args or []):
            assert (scratch / out).exists(), f"{where}: {part} did not write {out}"
