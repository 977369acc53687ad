"""The HTML evaluation report on real cases: self-contained, escaped, and rendered by Chromium."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from medseg.cli import app
from medseg.datasets import read_label_names
from medseg.evaluation import empty_rule_note, evaluate_folders
from medseg.report import report_html, worst_cases

CASES = ("hippocampus_143", "hippocampus_149", "hippocampus_165")
LABEL_NAMES = ("Anterior", "Posterior")
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

runner = CliRunner()


class _Page(HTMLParser):
    """Tags, attributes and cell texts of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self.headings: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(name, value or "") for name, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self._open = tag if tag in ("td", "th", "h3") else None

    def handle_data(self, data: str) -> None:
        if self._open in ("td", "th"):
            self.cells.append(data)
        elif self._open == "h3":
            self.headings.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _predict_badly(ref: np.ndarray, case: str) -> np.ndarray:
    """A prediction of known quality: exact, eroded, or shifted by 2 voxels."""
    if case == CASES[0]:
        return ref.copy()
    if case == CASES[1]:
        pred = np.zeros_like(ref)
        for value in (1, 2):
            pred[ndimage.binary_erosion(ref == value)] = value
        return pred
    return np.roll(ref, 2, axis=0)


@pytest.fixture(scope="module")
def folders(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """References, predictions and nnU-Net-named images of three real hippocampus cases."""
    root = tmp_path_factory.mktemp("report")
    out = {name: root / name for name in ("refs", "preds", "images")}
    for folder in out.values():
        folder.mkdir()
    for case in CASES:
        ref_file = demo_dataset / "labelsTr" / f"{case}.nii.gz"
        shutil.copy(ref_file, out["refs"] / ref_file.name)
        shutil.copy(
            demo_dataset / "imagesTr" / ref_file.name, out["images"] / f"{case}_0000.nii.gz"
        )
        ref = nib.load(ref_file)
        pred = _predict_badly(np.asarray(ref.dataobj).astype(np.uint8), case)
        nib.save(nib.Nifti1Image(pred, ref.affine, ref.header), out["preds"] / ref_file.name)
    out["labels"] = demo_dataset / "dataset.json"
    out["root"] = root
    return out


def _evaluate(folders: dict[str, Path], name: str, *extra: str | Path):  # noqa: ANN202
    args = [folders["preds"], folders["refs"], "--labels", folders["labels"]]
    args += ["--output", folders["root"] / f"{name}.json", *extra]
    return runner.invoke(app, ["evaluate", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def report(folders: dict[str, Path]) -> Path:
    """The report of the three cases drawn over their MR images."""
    path = folders["root"] / "report.html"
    result = _evaluate(folders, "metrics", "--report", path, "--images", folders["images"])
    assert result.exit_code == 0, result.output
    assert f"report: {path}" in result.output
    return path


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    page = _parse(text)
    assert "table" in page.tags
    for name in (*LABEL_NAMES, "foreground mean", *CASES):
        assert name in page.cells + page.headings
    assert len(page.images) >= 2
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG)
    assert not re.search(r"https?:", text, flags=re.IGNORECASE)
    linked = [v for k, v in page.attrs if k in ("src", "href") and not v.startswith("data:")]
    assert linked == []
    assert page.tags.count("link") == page.tags.count("script") == 0


def test_worst_cases_come_first_with_their_dice(report: Path, folders: dict[str, Path]) -> None:
    results = json.loads((folders["root"] / "metrics.json").read_text())
    page = _parse(report.read_text(encoding="utf-8"))
    # The exact copy scores 1, erosion and shift less: the shown order is by foreground Dice.
    fg = {c: np.mean([m["dice"] for m in results["cases"][c].values()]) for c in CASES}
    assert fg[CASES[0]] == 1.0
    assert page.headings == sorted(CASES, key=lambda c: fg[c])
    assert worst_cases(results, n=2) == page.headings[:2]
    assert f"{results['cases'][CASES[2]]['Anterior']['dice']:.4f}" in page.cells


def test_report_states_the_worst_case_rule_and_counts(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    page = _parse(text)
    assert {"missed", "spurious"} <= set(page.cells)
    assert html.escape(empty_rule_note("worst")) in text
    assert "also skips cases where exactly one side is empty" not in text  # the old rule


def test_report_states_the_exclude_rule(folders: dict[str, Path]) -> None:
    labels = read_label_names(folders["labels"])
    results = evaluate_folders(folders["preds"], folders["refs"], labels, empty="exclude")
    text = report_html(results, folders["preds"], folders["refs"])
    assert html.escape(empty_rule_note("exclude")) in text
    assert html.escape(empty_rule_note("worst")) not in text


def test_report_without_images_draws_on_grey(folders: dict[str, Path]) -> None:
    path = folders["root"] / "plain" / "report.html"
    result = _evaluate(folders, "plain", "--report", path)
    assert result.exit_code == 0, result.output
    page = _parse(path.read_text(encoding="utf-8"))
    assert len(page.images) == 1 + len(CASES)
    assert (folders["root"] / "plain.json").is_file()


def test_images_without_report_is_a_user_error(folders: dict[str, Path]) -> None:
    result = _evaluate(folders, "lonely", "--images", folders["images"])
    assert result.exit_code == 2
    assert "--report" in result.output


def test_missing_image_names_the_case(folders: dict[str, Path], tmp_path: Path) -> None:
    result = _evaluate(folders, "missing", "--report", tmp_path / "r.html", "--images", tmp_path)
    assert result.exit_code == 2
    assert "no file for case" in result.output
    assert not (tmp_path / "r.html").exists()


def test_text_is_escaped(folders: dict[str, Path]) -> None:
    evil = "<script>alert(1)</script>&"
    results = evaluate_folders(folders["preds"], folders["refs"], {0: "bg", 1: evil, 2: "b"})
    text = report_html(results, folders["preds"], folders["refs"])
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in text
    assert evil in _parse(text).cells


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


def test_chromium_renders_the_report(report: Path, tmp_path: Path) -> None:
    dom = _chromium("--dump-dom", report.as_uri(), user_dir=tmp_path / "profile").stdout
    page = _parse(dom)
    assert "table" in page.tags
    assert set(LABEL_NAMES) <= set(page.cells)
    assert len([s for s in page.images if s.startswith("data:image/png;base64,")]) >= 2

    shot = tmp_path / "shot.png"
    args = (f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri())
    _chromium(*args, user_dir=tmp_path / "profile")
    assert shot.read_bytes().startswith(PNG)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, plots and photos drawn
