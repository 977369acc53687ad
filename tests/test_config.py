"""medseg.config: defaults, YAML with dotted overrides, round trips, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medseg.config import (
    Config,
    ConfigError,
    downsampling_factors,
    from_dict,
    level_strides,
    load_config,
    save_config,
    to_dict,
)


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.root is None
    assert cfg.model.filters == (16, 32, 64, 128)
    assert cfg.model.patch_size == (40, 56, 40)
    assert cfg.train.epochs == 60
    assert cfg.train.augment.flip_axes == ()
    assert cfg.infer.overlap == 0.5


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "train:\n  epochs: 10\n  batch_size: 2\n"
        "model:\n  filters: [8, 16, 32]\n  patch_size: [32, 32, 32]\n"
    )

    cfg = load_config(path, ["train.epochs=2", "data.root=/x", "model.filters=[8,16,32,64]"])

    assert cfg.train.epochs == 2
    assert cfg.train.batch_size == 2
    assert cfg.data.root == Path("/x")
    assert cfg.model.filters == (8, 16, 32, 64)
    assert cfg.model.patch_size == (32, 32, 32)
    assert cfg.infer == Config().infer


def test_nested_override() -> None:
    cfg = load_config(overrides=["train.augment.flip_axes=[0, 2]", "infer.tta=true"])
    assert cfg.train.augment.flip_axes == (0, 2)
    assert cfg.infer.tta is True


@pytest.mark.parametrize(
    "cfg",
    [
        Config(),
        load_config(
            overrides=[
                "data.root=/data/x",
                "data.spacing=[0.8, 0.8, 5]",
                "model.spatial_dims=2",
                "model.patch_size=[64, 64]",
                "train.augment.flip_axes=[1]",
                "train.iterations_per_epoch=7",
            ]
        ),
        load_config(
            overrides=[
                "model.strides=[[1,1,1],[2,2,1],[2,2,2],[2,2,1]]",
                "model.patch_size=[64, 48, 20]",
            ]
        ),
    ],
    ids=["defaults", "custom", "strides"],
)
def test_dict_round_trip(cfg: Config, tmp_path: Path) -> None:
    raw = to_dict(cfg)
    assert from_dict(raw) == cfg
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw  # plain data only
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


BAD_OVERRIDES = {
    "unknown_key": (
        "train.epoch=2",
        "unknown config key train.epoch; valid keys here: train.epochs",
    ),
    "unknown_section": ("optim.lr=1", "valid keys here: data, model, train, infer"),
    "unknown_nested": ("train.augment.flip=1", "unknown config key train.augment.flip"),
    "wrong_type": ('train.epochs="a"', "train.epochs must be an integer, got 'a'"),
    "bool_as_int": ("train.epochs=true", "train.epochs must be an integer"),
    "null": ("train.lr=null", "train.lr must not be null"),
    "not_a_list": ("model.filters=8", "model.filters must be a list"),
    "epochs_zero": ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    "overlap_one": ("infer.overlap=1.0", "infer.overlap must be in [0, 1), got 1.0"),
    "fold_out_of_range": ("train.fold=5", "train.fold must be in [0, 4], got 5"),
    "ema_one": ("train.ema=1", "train.ema must be in [0, 1), got 1"),
    "no_train_cases": ("train.train_cases=0", "train.train_cases must be >= 1 or null, got 0"),
    "patch_not_divisible": (
        "model.patch_size=[40, 56, 36]",
        "model.patch_size must be multiples of 8",
    ),
    "spacing_length": ("data.spacing=[1, 1]", "data.spacing must be three positive numbers"),
    "strides_levels": (
        "model.strides=[[1,1,1],[2,2,2]]",
        "model.strides must have one entry per level (4)",
    ),
    "strides_axes": (
        "model.strides=[[1,1],[2,2],[2,2],[2,2]]",
        "model.strides entries must have 3 numbers",
    ),
    "strides_first_level": (
        "model.strides=[[2,2,2],[2,2,2],[2,2,2],[1,1,1]]",
        "model.strides[0] must be all 1",
    ),
    "strides_value": ("model.strides=[[1,1,1],[3,2,2],[2,2,2],[2,2,2]]", "must be 1 or 2"),
    "cache_mode": ("data.cache=ram", "data.cache must be one of memory, disk, off, got 'ram'"),
    "slice_axis": ("model.slice_axis=3", "model.slice_axis must be 0 (sagittal), 1 (coronal)"),
    "no_equals": ("train.epochs", "must look like section.key=value"),
    "section_as_value": ("train=5", "train must be a mapping"),
}


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


def test_deeper_filters_need_larger_patch() -> None:
    with pytest.raises(ConfigError, match=r"multiples of 16 \(2\^\(levels-1\) for 5 levels\)"):
        load_config(overrides=["model.filters=[8, 16, 32, 64, 128]"])
    cfg = load_config(
        overrides=["model.filters=[8, 16, 32, 64, 128]", "model.patch_size=[32, 48, 32]"]
    )
    assert cfg.model.patch_size == (32, 48, 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "config file not found"),
        ("train: [unclosed\n", "not valid YAML"),
        ("- train\n", "expected a mapping of sections"),
        ("train:\n  epochs: 0\n", "train.epochs must be >= 1, got 0"),
    ],
    ids=["missing", "invalid_yaml", "not_a_mapping", "bad_value"],
)
def test_bad_yaml_file(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_exponent_without_dot() -> None:
    assert load_config(overrides=["train.lr=3e-3"]).train.lr == pytest.approx(3e-3)


def test_override_into_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  # epochs: 3\n")
    assert load_config(path, ["train.epochs=2"]).train.epochs == 2


def test_strides_allow_anisotropic_patches() -> None:
    cfg = load_config(
        overrides=[
            "model.strides=[[1,1,1],[2,2,1],[2,2,1],[2,2,2]]",
            "model.patch_size=[64, 64, 6]",
        ]
    )
    assert downsampling_factors(cfg.model) == [8, 8, 2]
    assert level_strides(cfg.model)[1] == [2, 2, 1]
    assert level_strides(Config().model) == [[1, 1, 1]] + [[2, 2, 2]] * 3
    with pytest.raises(ConfigError, match=r"must be multiples of \[8, 8, 2\] per axis"):
        load_config(
            overrides=[
                "model.strides=[[1,1,1],[2,2,1],[2,2,1],[2,2,2]]",
                "model.patch_size=[64, 64, 5]",
            ]
        )


def test_save_selected_keys_with_comment(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.batch_size=3", "model.patch_size=[32, 32, 32]"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path, comment="line one\n\nline two", only=["model", "train.batch_size"])
    text = path.read_text()
    assert text.startswith("# line one\n#\n# line two\nmodel:\n")
    assert "patch_size: [32, 32, 32]" in text
    assert yaml.safe_load(text) == {"model": to_dict(cfg)["model"], "train": {"batch_size": 3}}
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("written", "mode"), [("true", "memory"), ("false", "off"), ("off", "off"), ("disk", "disk")]
)
def test_old_cache_switch_still_loads(tmp_path: Path, written: str, mode: str) -> None:
    """Run folders written before data.cache named its mode hold true/false (and YAML reads
    an unquoted off as false)."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data:\n  cache: {written}\nmodel:\n  spatial_dims: 2\n  patch_size: [32, 48]\n"
    )
    cfg = load_config(path)
    assert cfg.data.cache == mode and cfg.model.slice_axis == 2  # 2D runs then sliced axially
    save_config(cfg, path)
    assert load_config(path) == cfg


def _readme_section(title: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_configuration_block_shows_the_defaults() -> None:
    section = _readme_section("Configuration")
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == to_dict(Config())


def test_readme_lists_the_planned_keys() -> None:
    from medseg.planner import PLANNED_KEYS

    section = _readme_section("Configuration").split("```", 2)[2]
    for key in (*PLANNED_KEYS, "model.slice_axis", "train.device", "infer.device"):
        assert f"`{key}`" in section, key
