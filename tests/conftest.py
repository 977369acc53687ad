"""Shared fixtures: the demo dataset shipped in the package and the optional shared data."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets in ../shared/data; skips the test in clones that lack them."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not available")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def demo_dataset() -> Path:
    """The 10-case MSD hippocampus subset shipped in medseg/data/hippocampus_demo."""
    return Path(str(files("medseg") / "data" / "hippocampus_demo"))


TINY = [
    "model.filters=[4,8,16]",
    "model.deep_supervision=1",
    "model.patch_size=[32,32,32]",
    "train.epochs=2",
    "train.iterations_per_epoch=2",
    "train.batch_size=2",
    "train.val_every=1",
    "train.device=cpu",
    "infer.device=cpu",
]


@pytest.fixture(scope="session")
def tiny_overrides(demo_dataset: Path) -> list[str]:
    """Overrides for a seconds-long CPU training on the bundled dataset."""
    return [f"data.root={demo_dataset}", *TINY]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    """A run folder trained for a few steps (weights are meaningless; the files are real)."""
    from medseg.config import load_config
    from medseg.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(load_config(None, tiny_overrides), run_dir)


def read_sitk(path: Path):  # noqa: ANN201 - SimpleITK image
    """Read a file, or a DICOM series folder, independently of medseg (SimpleITK, LPS)."""
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))
