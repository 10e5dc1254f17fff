"""The config system: YAML + dataclass validation + key=value overrides."""

from __future__ import annotations

import pytest
import yaml

from photoz_hpc.config import Config, load_config, save_config
from photoz_hpc.errors import ConfigError


def test_defaults_are_the_paper_values():
    from photoz_hpc.augment.draws import resolve_augment
    from photoz_hpc.survey import load_survey

    cfg = Config()
    sdss = resolve_augment(cfg.augment, load_survey("sdss"))  # crop and jitter unset: the survey's, SDSS 64 and 7
    assert cfg.augment.ebv_max == 0.5 and sdss.jitter_max == 7 and sdss.crop_size == 64
    assert cfg.moco.momentum == 0.999 and cfg.moco.temperature == 0.2 and cfg.moco.queue_size == 65536


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "augment": {"noise": False}, "loader": {"batch_size": 32}}))
    cfg = load_config(path, ["loader.batch_size=64", "temperature=0.1", "out_dir=/tmp/x", "augment.ebv_max=1"])
    assert cfg.seed == 3 and cfg.augment.noise is False
    assert cfg.loader.batch_size == 64 and cfg.moco.temperature == 0.1 and cfg.out_dir == "/tmp/x"
    assert cfg.augment.ebv_max == 1.0 and isinstance(cfg.augment.ebv_max, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment.redening=false", "augment.redening"),
        ("augment.noise=maybe", "augment.noise"),
        ("loader.batch_size=1.5", "loader.batch_size"),
        ("loader.batch_size=0", "loader.batch_size"),
        ("loader.device=tpu", "loader.device"),
        ("nosuchkey=1", "nosuchkey"),
        ("augment=3", "augment"),
        ("justtext", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  depth: 50\n")
    with pytest.raises(ConfigError, match=r"model\.depth.*bad\.yaml"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "b.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7", "moco.queue_mode=local"])
    saved = save_config(cfg, tmp_path)
    assert load_config(saved) == cfg


def test_shipped_configs_load():
    from pathlib import Path

    from photoz_hpc.config import FinetuneRunConfig

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("**/*.yaml"))
    assert len(configs) >= 6, "no configs shipped"
    for path in configs:  # a fine-tuning config says so in its name; sweep files are not run configs
        if path.name.startswith("sweep"):
            continue
        if path.parent.name == "surveys":  # survey descriptions: their own schema (tests/test_survey.py)
            from photoz_hpc.survey import load_survey

            assert load_survey(path).name == path.stem, path
            continue
        root = FinetuneRunConfig if "finetune" in path.name else Config
        assert isinstance(load_config(path, root=root), root), path


def test_yaml_quirks_are_handled_or_explained(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(path).optim.weight_decay == 1e-4
    with pytest.raises(ConfigError, match="train.resume.*quote"):
        load_config(None, ["train.resume=off"])
    with pytest.raises(ConfigError, match="optim.lr.*must be a number"):
        load_config(None, ["optim.lr=fast"])


def test_each_command_validates_only_its_own_sections(tmp_path):
    from photoz_hpc.config import FinetuneRunConfig, packaged_config

    ft = load_config(packaged_config("finetune.yaml"), ["label_fraction=0.25", "init=none"], root=FinetuneRunConfig)
    assert ft.finetune.label_fraction == 0.25 and ft.optim.lr == 0.004 and ft.optim.milestones == [60.0, 90.0]
    with pytest.raises(ConfigError, match="unknown config key 'moco'"):
        load_config(None, ["moco.queue_size=8"], root=FinetuneRunConfig)
    with pytest.raises(ConfigError, match="unknown config key 'finetune'"):
        load_config(None, ["finetune.init=none"], root=Config)
    # a partial optim section keeps fine-tuning's defaults for the keys it does not set
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01}}))
    cfg = load_config(path, root=FinetuneRunConfig)
    assert cfg.optim.lr == 0.01 and cfg.optim.schedule == "step" and cfg.optim.weight_decay == 0.0


def test_a_bad_value_names_where_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": "abc"}, "loader": {"batch_size": 8}}))
    with pytest.raises(ConfigError, match=r"optim.lr.*\(in .*c.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optim.lr.*command-line override 'optim.lr=abc'"):
        load_config(None, ["optim.lr=abc"])
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"loader": {"batch_size": 8}}))
    with pytest.raises(ConfigError, match=r"'optim.lr'.*command-line override 'lr=abc'") as exc:
        load_config(good, ["lr=abc"])
    assert "good.yaml" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"loader.batch_size.*\(in .*c2.yaml\)"):
        (tmp_path / "c2.yaml").write_text(yaml.safe_dump({"loader": {"batch_size": 0}}))
        load_config(tmp_path / "c2.yaml", ["seed=2"])


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("override", ["trian.epochs=1", "foreign"])
def test_a_mistyped_or_foreign_section_on_the_command_line_is_attributed_to_it(tmp_path, command, override):
    """An unknown section set only by an override names the override, not the config file (issue 26, item 8)."""
    from photoz_hpc.config import ROOTS

    if override == "foreign":  # the other command's section
        override = "finetune.label_fraction=0.5" if command == "pretrain" else "moco.queue_size=8"
    section = override.split(".")[0]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    with pytest.raises(ConfigError, match=rf"unknown config key '{section}'.*command-line override '{override}'") as exc:
        load_config(path, [override], root=ROOTS[command])
    assert "c.yaml" not in str(exc.value)
    # the same section in the file is the file's: both there and on the command line, the file is named
    path.write_text(yaml.safe_dump({section: {"epochs": 2}}))
    with pytest.raises(ConfigError, match=rf"unknown config key '{section}'.*\(in .*c.yaml\)"):
        load_config(path, [override], root=ROOTS[command])


@pytest.mark.parametrize("command, config, override", [
    ("pretrain", "demo.yaml", "trian.epochs=1"),
    ("pretrain", "demo.yaml", "finetune.label_fraction=0.5"),
    ("finetune", "demo_finetune.yaml", "trian.epochs=1"),
    ("finetune", "demo_finetune.yaml", "moco.queue_size=8"),
])
def test_cli_names_the_override_for_an_unknown_section(command, config, override):
    from photoz_hpc.config import packaged_config
    from tests.helpers import run_cli

    res = run_cli(command, "--config", str(packaged_config(config)), override, timeout=120)
    assert res.returncode != 0
    assert f"command-line override '{override}'" in res.stderr and f"(in {packaged_config(config)})" not in res.stderr


def test_demo_finetune_config_alone_is_the_quickstart_fine_tuning():
    """configs/demo_finetune.yaml used alone must not fall back to data/synthetic and a ResNet-50 (issue 26)."""
    from photoz_hpc.config import FinetuneRunConfig, packaged_config

    pre = load_config(packaged_config("demo.yaml"))
    ft = load_config(packaged_config("demo_finetune.yaml"), root=FinetuneRunConfig)
    assert ft.data.path == pre.data.path == "data/quickstart"
    assert (ft.model.arch, ft.model.width, ft.model.stem_kernel) == (pre.model.arch, pre.model.width,
                                                                     pre.model.stem_kernel)
    assert ft.augment.crop_size == pre.augment.crop_size
    assert ft.out_dir != pre.out_dir
