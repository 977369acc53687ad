"""medseg.export: Slicer files, colour tables, statistics, QC pictures and DICOM-SEG on real scans.

Geometry is always checked in physical space, through readers independent of medseg (nibabel for
the input NIfTI, ITK and slicerio for .seg.nrrd, pydicom/highdicom for DICOM).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import itk
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import slicerio
from nibabel.orientations import inv_ornt_aff, io_orientation
from PIL import Image
from pydicom.pixels import apply_rescale

from medseg.export import (
    display_aspect,
    label_statistics,
    qc_figure,
    write_color_table,
    write_dicom_seg,
    write_qc_png,
    write_seg_nrrd,
    write_stats_csv,
    write_stats_json,
)
from medseg.export.anatomy import lookup_anatomy, palette_color
from medseg.export.colors import srgb_to_lab
from medseg.export.labels import describe_label, describe_labels
from medseg.export.qc import to_ras, view_slice
from medseg.io import ImageError, Volume, load_labels, load_volume

LPS = np.array([-1.0, -1.0, 1.0])
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# name -> (shared_data folder or None for the bundled demo, image, labels, label names)
CASES = {
    "hippocampus_demo": (
        None,
        "imagesTr/hippocampus_143.nii.gz",
        "labelsTr/hippocampus_143.nii.gz",
        {0: "background", 1: "Anterior", 2: "Posterior"},
    ),
    "sct_t2_psr": (
        "sct_example",
        "imagesTr/t2_0000.nii.gz",
        "labelsTr/t2.nii.gz",
        {0: "background", 1: "spinal cord"},
    ),
    "spleen_0.8x0.8x5mm": (
        "spleen_crop",
        "imagesTr/spleen_2_crop_0000.nii.gz",
        "labelsTr/spleen_2_crop.nii.gz",
        {0: "background", 1: "spleen", 3: "tumour"},
    ),
}
# Colours from Slicer's GenericAnatomyColors (hippocampus: FreeSurfer), written out independently.
KNOWN_COLORS = {
    "Anterior": (220, 216, 20),
    "spinal cord": (244, 214, 49),
    "spleen": (157, 108, 162),
}


@pytest.fixture
def case(request: pytest.FixtureRequest, demo_dataset: Path) -> tuple[Path, Path, dict[int, str]]:
    folder, image, labels, names = CASES[request.param]
    root = demo_dataset if folder is None else request.getfixturevalue("shared_data") / folder
    return root / image, root / labels, names


def _load(case: tuple[Path, Path, dict[int, str]]) -> tuple[Volume, np.ndarray, dict[int, str]]:
    image, labels, names = case
    return load_volume(image), load_labels(labels).array, names


def _read_color_table(path: Path) -> dict[int, tuple[str, tuple[int, ...]]]:
    """value -> (name, RGBA) from a Slicer colour table."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            value, name, *rgba = line.split()
            table[int(value)] = (name, tuple(int(c) for c in rgba))
    return table


# --- colours and codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "meaning"),
    [
        ("Liver", "Liver"),
        ("kidney_left", "Kidney"),
        ("Left Kidney", "Kidney"),
        ("lung_upper_lobe_left", "Lung"),
        ("whole tumor", "Neoplasm"),
        ("Anterior", "Hippocampus"),
        ("anterior tibial artery", "Artery"),
        ("spinal-cord", "Spinal cord"),
        ("vertebrae_L1", "Vertebra"),
    ],
)
def test_lookup_anatomy(name: str, meaning: str) -> None:
    anatomy = lookup_anatomy(name)
    assert anatomy is not None
    assert anatomy.type.meaning == meaning
    assert anatomy.type.scheme == "SCT"


def test_unknown_labels_get_stable_distinct_colours() -> None:
    assert lookup_anatomy("thing_42") is None
    colours = [palette_color(v) for v in range(1, 65)]
    assert colours == [palette_color(v) for v in range(1, 65)]
    assert len(set(colours)) == len(colours)
    assert all(0 <= c <= 255 for rgb in colours for c in rgb)
    info = describe_label(9, {})
    assert (info.name, info.name_generated, info.color_generated) == ("label_9", True, True)
    assert info.type.meaning == "Tissue"


def test_color_table_parses_back(tmp_path: Path) -> None:
    names = {0: "background", 1: "liver", 2: "left kidney", 7: "my thing"}

    path = write_color_table(names, tmp_path / "case.ctbl")

    table = _read_color_table(path)
    assert list(table) == [0, 1, 2, 7]
    assert [n for n, _ in table.values()] == ["background", "liver", "left_kidney", "my_thing"]
    assert table[0][1] == (0, 0, 0, 0)
    assert table[1][1] == (221, 130, 101, 255)
    assert table[2][1] == (185, 102, 83, 255)
    assert table[7][1] == (*palette_color(7), 255)
    assert list(tmp_path.iterdir()) == [path]


# Always-running label set: one structure alone and two sibling families.
SIBLINGS = {
    0: "background",
    1: "liver",
    2: "kidney_right",
    3: "kidney_left",
    4: "vertebrae_L1",
    5: "vertebrae_L2",
    6: "vertebrae_L3",
}
LEFT, RIGHT, BOTH = "7771000", "24028007", "51440002"


def _delta_e(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """CIE76 distance of two RGB colours, through highdicom's own CIELab conversion."""
    lab_a, lab_b = (np.array(hd.color.CIELabColor.from_rgb(*c[:3]).lab) for c in (a, b))
    return float(np.linalg.norm(lab_a - lab_b))


def _assert_siblings_distinct(colours: dict[int, tuple[int, ...]], family: list[int]) -> None:
    for i, a in enumerate(family):
        for b in family[i + 1 :]:
            assert _delta_e(colours[a], colours[b]) >= 10, (a, b, colours[a], colours[b])


def test_sibling_labels_get_distinct_colours() -> None:
    infos = describe_labels(list(range(1, 7)), SIBLINGS)
    colours = {i.value: i.color for i in infos}

    assert len(set(colours.values())) == 6
    assert colours[1] == (221, 130, 101)  # liver keeps Slicer's liver colour
    assert colours[2] == (185, 102, 83)  # the first kidney keeps the kidney colour
    assert colours[4] == (226, 202, 134)  # the first vertebra keeps the vertebra colour
    _assert_siblings_distinct(colours, [2, 3])
    _assert_siblings_distinct(colours, [4, 5, 6])
    # Value by value (the colour table, the report) gives the same colours as all at once.
    assert {v: describe_label(v, SIBLINGS).color for v in colours} == colours
    assert [i.color_generated for i in infos] == [False] * 6
    # Labels the map does not name are coloured after the named ones and never change them.
    more = {i.value: i.color for i in describe_labels([*range(1, 7), 9, 10], SIBLINGS)}
    assert {v: more[v] for v in colours} == colours
    assert len(set(more.values())) == 8
    with pytest.raises(ValueError, match="0 is background"):
        describe_label(0, SIBLINGS)


def test_srgb_to_lab_matches_highdicom() -> None:
    rgb = [(0, 0, 0), (255, 255, 255), (221, 130, 101), (0, 151, 206), (226, 202, 134)]
    expected = [hd.color.CIELabColor.from_rgb(*c).lab for c in rgb]
    np.testing.assert_allclose(srgb_to_lab(rgb), expected, atol=0.02)


@pytest.mark.parametrize("folder", ["CT", "MR"])
def test_totalsegmentator_names_get_distinct_colours(
    shared_data: Path, folder: str, tmp_path: Path
) -> None:
    dataset = json.loads((shared_data / "totalseg_examples" / folder / "dataset.json").read_text())
    names = {int(v): n for n, v in dataset["labels"].items()}
    values = sorted(v for v in names if v > 0)

    colours = {i.value: i.color for i in describe_labels(values, names)}

    assert len(set(colours.values())) == len(values) == {"CT": 117, "MR": 50}[folder]
    by_name = {names[v]: c for v, c in colours.items()}
    assert by_name["liver"] == (221, 130, 101)
    assert by_name["spleen"] == (157, 108, 162)
    assert by_name["kidney_right"] == (185, 102, 83)  # value 2, before kidney_left (3)
    for prefix in ("kidney_", "vertebrae_", "rib_left_", "rib_right_", "lung_"):
        _assert_siblings_distinct(colours, [v for v in values if names[v].startswith(prefix)])
    if folder == "CT":
        ribs = [v for v in values if names[v].startswith("rib_")]
        assert len(ribs) == 24
        _assert_siblings_distinct(colours, ribs)
    table = _read_color_table(write_color_table(names, tmp_path / "t.ctbl"))
    assert {v: rgba[:3] for v, (_, rgba) in table.items() if v} == colours


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("kidney_left", LEFT),
        ("Left Kidney", LEFT),
        ("rib_left_3", LEFT),
        ("lung_upper_lobe_left", LEFT),
        ("kidney_right", RIGHT),
        ("Right-Lung", RIGHT),
        ("adrenal_gland_right", RIGHT),
        ("left and right lungs", BOTH),
        ("bilateral kidneys", BOTH),
        ("liver", None),
        ("vertebrae_L1", None),
        ("leftover tissue", None),
        ("Anterior", None),
    ],
)
def test_laterality_from_name(name: str, side: str | None) -> None:
    code = describe_label(1, {1: name}).laterality
    assert (code.value if code else None) == side
    if code is not None:
        assert code.scheme == "SCT"
        assert code.meaning == {LEFT: "Left", RIGHT: "Right", BOTH: "Right and left"}[side]


# --- .seg.nrrd ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_seg_nrrd_round_trip_in_physical_space(case, tmp_path: Path) -> None:
    volume, labels, names = _load(case)
    values = [int(v) for v in np.unique(labels) if v > 0]

    path = write_seg_nrrd(labels, volume, names, tmp_path / "case.seg.nrrd")

    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_array_equal(seg["voxels"], labels)
    table = _read_color_table(write_color_table(names, tmp_path / "case.ctbl"))
    segments = {s["labelValue"]: s for s in seg["segments"]}
    assert sorted(segments) == values
    for value in values:
        segment = segments[value]
        mask = np.argwhere(labels == value)
        assert segment["name"] == names[value]
        assert segment["id"] == f"Segment_{value}"
        assert segment["layer"] == 0
        assert segment["extent"] == [
            int(b) for lo, hi in zip(mask.min(0), mask.max(0), strict=True) for b in (lo, hi)
        ]
        np.testing.assert_allclose(segment["color"], np.array(table[value][1][:3]) / 255, atol=1e-6)
        assert segment["nameAutoGenerated"] is False
        assert segment["terminology"]["type"][0] == "SCT"
    for value, segment in segments.items():
        if names[value] in KNOWN_COLORS:
            assert table[value][1][:3] == KNOWN_COLORS[names[value]]
            assert segment["colorAutoGenerated"] is False

    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    fields = ("ID", "Name", "Color", "LabelValue", "Layer", "Extent", "Tags")
    for i in range(len(values)):
        for field in (*fields, "NameAutoGenerated", "ColorAutoGenerated"):
            assert f"Segment{i}_{field}" in header

    # Voxel index -> physical point: the input NIfTI (nibabel) vs the NRRD (ITK), in LPS mm.
    affine = nib.load(case[0]).affine
    image = itk.imread(str(path))
    written = itk.array_view_from_image(image)  # (Z, Y, X)
    labelled = np.argwhere(labels > 0)
    picks = labelled[np.random.default_rng(0).choice(len(labelled), 30, replace=False)]
    corners = np.array([[0, 0, 0], np.array(labels.shape) - 1])
    for i, j, k in np.concatenate([picks, corners]).tolist():
        expected = (affine @ [i, j, k, 1.0])[:3] * LPS
        point = image.TransformIndexToPhysicalPoint([i, j, k])
        np.testing.assert_allclose(np.array(point), expected, atol=1e-3)
        assert written[k, j, i] == labels[i, j, k]


def _sibling_map(shape: tuple[int, ...]) -> np.ndarray:
    """Values 1..6 of `SIBLINGS` in slabs of different sizes (so QC sorts them by size)."""
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, 7):
        labels[2 * value : 2 * value + 2, 5 : 5 + 3 * value, 8:20] = value
    return labels


def test_seg_nrrd_color_table_and_qc_agree_on_colours_and_sides(
    demo_dataset: Path, tmp_path: Path
) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    labels = _sibling_map(volume.shape)

    seg_path = write_seg_nrrd(labels, volume, SIBLINGS, tmp_path / "case.seg.nrrd")
    table = _read_color_table(write_color_table(SIBLINGS, tmp_path / "case.ctbl"))

    segments = {s["labelValue"]: s for s in slicerio.read_segmentation(str(seg_path))["segments"]}
    colours = {v: table[v][1][:3] for v in range(1, 7)}
    assert len(set(colours.values())) == 6
    for value, segment in segments.items():
        np.testing.assert_allclose(segment["color"], np.array(colours[value]) / 255, atol=1e-6)
    sides = {v: s["terminology"].get("typeModifier") for v, s in segments.items()}
    assert sides == {
        1: None,
        2: ["SCT", RIGHT, "Right"],
        3: ["SCT", LEFT, "Left"],
        4: None,
        5: None,
        6: None,
    }
    header = nrrd.read_header(str(seg_path))
    tags = {int(header[f"Segment{i}_LabelValue"]): header[f"Segment{i}_Tags"] for i in range(6)}
    assert "~SCT^64033007^Kidney~SCT^7771000^Left~" in tags[3]
    assert "~SCT^10200004^Liver~^^~" in tags[1]

    legend = qc_figure(labels, volume, SIBLINGS).legends[0]
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        value = int(text.get_text().split()[0])
        np.testing.assert_allclose(
            handle.get_facecolor()[:3], np.array(colours[value]) / 255, atol=1e-6
        )


def test_seg_nrrd_rejects_wrong_grid(demo_dataset: Path, tmp_path: Path) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    with pytest.raises(ValueError, match="labels have shape"):
        write_seg_nrrd(np.zeros((2, 2, 2), np.uint8), volume, {}, tmp_path / "x.seg.nrrd")
    with pytest.raises(TypeError, match="integer"):
        write_seg_nrrd(np.zeros(volume.shape), volume, {}, tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["hippocampus_demo", "spleen_0.8x0.8x5mm"], indirect=True)
def test_label_statistics(case, tmp_path: Path) -> None:
    volume, labels, names = _load(case)
    names = {**names, 9: "absent"}
    affine = nib.load(case[0]).affine
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))

    stats = label_statistics(labels, volume, names)

    assert [row["value"] for row in stats["labels"]] == sorted(v for v in names if v > 0)
    for row in stats["labels"]:
        mask = labels == row["value"]
        count = int(mask.sum())
        assert row["name"] == names[row["value"]]
        assert row["voxels"] == count
        assert row["volume_ml"] == count * voxel_mm3 / 1000
        if count == 0:
            assert row["mean_intensity"] is None and row["centroid_ras_mm"] is None
            continue
        index = np.argwhere(mask)
        centroid = (affine @ [*index.mean(axis=0), 1.0])[:3]
        np.testing.assert_allclose(row["centroid_ras_mm"], centroid, atol=1e-6)
        np.testing.assert_allclose(row["centroid_lps_mm"], centroid * LPS, atol=1e-6)
        inside = volume.array[0][mask].astype(np.float64)
        assert row["mean_intensity"] == pytest.approx(inside.mean(), rel=1e-9)
        assert row["std_intensity"] == pytest.approx(inside.std(), rel=1e-9)
        assert row["bbox_min_voxel"] == index.min(axis=0).tolist()
        assert row["bbox_max_voxel"] == index.max(axis=0).tolist()

    text = write_stats_json(stats, tmp_path / "stats.json").read_text()
    assert json.loads(text, parse_constant=_reject) == stats


def _reject(token: str) -> None:
    raise AssertionError(f"JSON holds {token}")


def test_stats_json_and_csv_have_no_nan(demo_dataset: Path, tmp_path: Path) -> None:
    volumes = [
        load_volume(demo_dataset / "imagesTr" / f"hippocampus_{n}.nii.gz") for n in (143, 149)
    ]
    labels = [
        load_labels(demo_dataset / "labelsTr" / f"hippocampus_{n}.nii.gz") for n in (143, 149)
    ]
    names = {0: "background", 1: "Anterior", 2: "Posterior", 3: "absent"}
    stats = [
        label_statistics(lab.array, vol, names) for lab, vol in zip(labels, volumes, strict=True)
    ]
    stats[0]["labels"][0]["std_intensity"] = float("nan")

    parsed = json.loads(
        write_stats_json(stats[0], tmp_path / "a.json").read_text(), parse_constant=_reject
    )
    with (write_stats_csv(stats, tmp_path / "stats.csv")).open(newline="") as handle:
        rows = list(csv.DictReader(handle))

    assert parsed["labels"][0]["std_intensity"] is None
    assert [(r["case"], r["name"]) for r in rows] == [
        (case, name)
        for case in ("hippocampus_143", "hippocampus_149")
        for name in list(names.values())[1:]
    ]
    absent = rows[2]
    assert (
        absent["voxels"] == "0" and absent["centroid_ras_x_mm"] == "" and absent["bbox_min_i"] == ""
    )
    assert float(rows[3]["volume_ml"]) == stats[1]["labels"][0]["volume_ml"]
    assert "nan" not in (tmp_path / "stats.csv").read_text().lower()


# --- QC picture -----------------------------------------------------------------------------


def test_display_aspect_from_spacing() -> None:
    spacing = (0.8, 0.8, 5.0)
    assert display_aspect(spacing, "axial") == 1.0
    assert display_aspect(spacing, "coronal") == 5.0 / 0.8
    assert display_aspect(spacing, "sagittal") == 5.0 / 0.8
    assert display_aspect((1.0, 2.0, 3.0), "axial") == 2.0
    with pytest.raises(ValueError, match="unknown view"):
        display_aspect(spacing, "oblique")


def test_to_ras_reorders_axes_and_spacing() -> None:
    """A PSR-stored grid with spacings (0.5, 2, 3) shows as R, A, S with spacings (3, 0.5, 2)."""
    affine = np.array([[0, 0, 3.0, 10], [-0.5, 0, 0, 20], [0, 2.0, 0, 30], [0, 0, 0, 1]])
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)

    ras, spacing = to_ras(array, affine)

    assert spacing == (3.0, 0.5, 2.0)
    assert ras.shape == (6, 4, 5)
    ras_affine = affine @ inv_ornt_aff(io_orientation(affine), array.shape)
    np.testing.assert_allclose(ras_affine[:3, :3], np.diag(spacing))
    assert ras[0, 0, 0] == array[3, 0, 0]  # most posterior stored voxel is RAS y index 0


def test_view_slice_is_radiological() -> None:
    ras = np.zeros((4, 5, 6))
    ras[-1] = 1.0  # the patient's rightmost plane
    ras[:, -1] += 2.0  # the most anterior plane
    axial = view_slice(ras, "axial", 0)
    assert axial.shape == (5, 4)  # rows along A, columns along R
    assert (axial[:, 0] % 2 == 1).all() and (axial[:, 1:] % 2 == 0).all()  # right on the left
    assert (axial[-1] >= 2).all()  # anterior at the top with origin="lower"
    sagittal = view_slice(ras, "sagittal", 0)
    assert (sagittal[:, 0] >= 2).all()  # anterior on the left


@pytest.mark.parametrize(
    ("case", "coronal_aspect"),
    [("hippocampus_demo", 1.0), ("spleen_0.8x0.8x5mm", 5.0 / 0.7949219942092896)],
    indirect=["case"],
)
def test_qc_png(case, coronal_aspect: float, tmp_path: Path) -> None:
    volume, labels, names = _load(case)

    path = write_qc_png(labels, volume, names, tmp_path / "qc.png")

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 800 and image.height > 250
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10
    assert path.stat().st_size > 20_000
    n_labels = len(np.unique(labels)) - 1
    panels = [ax for ax in qc_figure(labels, volume, names).axes if ax.images]
    assert len(panels) == 3 * n_labels
    for ax, view in zip(panels, ["axial", "coronal", "sagittal"] * n_labels, strict=True):
        # both cases are stored in RAS order, so RAS spacing is the stored spacing
        assert ax.get_aspect() == pytest.approx(display_aspect(volume.spacing, view))
    assert panels[1].get_aspect() == pytest.approx(coronal_aspect, rel=1e-6)


def test_qc_caps_rows_and_handles_empty_maps(demo_dataset: Path, tmp_path: Path) -> None:
    volume = load_volume(demo_dataset / "imagesTr" / "hippocampus_143.nii.gz")
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for value in range(1, 15):  # 14 labels, value 14 the largest
        labels[2 * value - 1 : 2 * value + 1, 5 : 5 + value, 10:20] = value

    fig = qc_figure(labels, volume, {}, max_rows=12)

    assert len([ax for ax in fig.axes if ax.images]) == 36
    assert fig.axes[0].get_ylabel() == "label_14"
    assert any(
        t.get_text().startswith("2 smaller labels not shown: label_2, label_1") for t in fig.texts
    )
    empty = write_qc_png(np.zeros_like(labels), volume, {}, tmp_path / "empty.png")
    with Image.open(empty) as image:
        assert image.format == "PNG"


# --- DICOM-SEG ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20-slice CT with the Study/Series UIDs its anonymiser blanked put back (SOP UIDs stay
    blank; they are in each file's meta header)."""
    source = shared_data / "totalseg_examples" / "CT_dicom" / "example_ct_dicom"
    folder = tmp_path_factory.mktemp("ct") / "example_ct_dicom"
    folder.mkdir()
    study, series = (pydicom.uid.generate_uid(entropy_srcs=[s]) for s in ("study", "series"))
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(folder / file.name)
    return folder


@pytest.fixture
def series(request: pytest.FixtureRequest) -> Path:
    if request.param == "ct_20_slices":
        return request.getfixturevalue("ct_series")
    return (
        request.getfixturevalue("shared_data") / "hippocampus_dicom" / "Study1" / "13_HCropVolume"
    )


def _thresholds(intensity: np.ndarray) -> np.ndarray:
    """Two thresholds half-way between integer intensities, so float rounding cannot move them."""
    assert np.array_equal(intensity, np.round(intensity))
    return np.floor(np.percentile(intensity, [50, 90])) + 0.5


def _voxels_of_plane(affine: np.ndarray, ipp, orientation, spacing, shape) -> np.ndarray:
    """medseg voxel index (rows, columns, 3) of each pixel centre of a DICOM plane."""
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    lps = (
        np.asarray(ipp, float)
        + (c[..., None] * spacing[1] * row_dir)
        + (r[..., None] * spacing[0] * col_dir)
    )
    ras = np.concatenate([lps * LPS, np.ones((*shape, 1))], axis=-1)
    index = ras @ np.linalg.inv(affine).T
    np.testing.assert_allclose(index[..., :3], np.rint(index[..., :3]), atol=1e-3)
    return np.rint(index[..., :3]).astype(int)


@pytest.mark.parametrize("series", ["ct_20_slices", "mr_hippocampus"], indirect=True)
def test_dicom_seg_frames_match_labels_in_physical_space(series: Path, tmp_path: Path) -> None:
    volume = load_volume(series)
    thresholds = _thresholds(volume.array[0])
    labels = np.digitize(volume.array[0], thresholds).astype(np.uint8)
    names = {0: "background", 1: "soft tissue", 2: "bright"}

    path = write_dicom_seg(labels, volume, names, tmp_path / "seg.dcm")

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["soft tissue", "bright"]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
    for segment, value in zip(seg.SegmentSequence, (1, 2), strict=True):
        lab = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue)
        np.testing.assert_allclose(lab.to_rgb(), describe_label(value, names).color, atol=1)
        type_item = segment.SegmentedPropertyTypeCodeSequence[0]
        assert type_item.CodingSchemeDesignator == "SCT"
        assert "SegmentedPropertyTypeModifierCodeSequence" not in type_item  # no side in the names
    sources = {}
    for file in series.iterdir():
        ds = pydicom.dcmread(file)
        sources[ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID] = ds
    (series_uid,) = {ds.SeriesInstanceUID for ds in sources.values()}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {item.ReferencedSOPInstanceUID for item in referenced} == set(sources)
    assert seg.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID

    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        ipp = group.PlanePositionSequence[0].ImagePositionPatient
        source = sources[uid]
        np.testing.assert_allclose(
            [float(v) for v in ipp], [float(v) for v in source.ImagePositionPatient]
        )
        # The frame equals the medseg label map on the voxels at the same physical points ...
        index = _voxels_of_plane(volume.affine, ipp, orientation, spacing, frame.shape)
        assert len(np.unique(index[..., 2])) == 1  # one medseg slice per frame here
        np.testing.assert_array_equal(
            frame, labels[index[..., 0], index[..., 1], index[..., 2]] == segment
        )
        # ... and the same threshold applied to that instance's own pixels (no geometry at all).
        own = np.digitize(apply_rescale(source.pixel_array, source), thresholds)
        np.testing.assert_array_equal(frame, own == segment)
        seen.add((uid, segment))
    expected = {
        (uid, segment)
        for uid, ds in sources.items()
        for segment in (1, 2)
        if (np.digitize(apply_rescale(ds.pixel_array, ds), thresholds) == segment).any()
    }
    assert seen == expected


def test_dicom_seg_codes_sides_and_colours_as_the_other_formats(
    ct_series: Path, tmp_path: Path
) -> None:
    volume = load_volume(ct_series)
    labels = _sibling_map(volume.shape)

    path = write_dicom_seg(labels, volume, SIBLINGS, tmp_path / "seg.dcm")

    table = _read_color_table(write_color_table(SIBLINGS, tmp_path / "case.ctbl"))
    seg = hd.seg.segread(path)  # highdicom parses it back as a Segmentation
    raw = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in raw.SegmentSequence] == [SIBLINGS[v] for v in range(1, 7)]
    for value, segment in enumerate(seg.SegmentSequence, start=1):
        lab = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue)
        np.testing.assert_allclose(lab.to_rgb(), table[value][1][:3], atol=1)
        type_item = raw.SegmentSequence[value - 1].SegmentedPropertyTypeCodeSequence[0]
        modifiers = type_item.get("SegmentedPropertyTypeModifierCodeSequence", [])
        sides = [(m.CodeValue, m.CodingSchemeDesignator, m.CodeMeaning) for m in modifiers]
        expected = {2: [(RIGHT, "SCT", "Right")], 3: [(LEFT, "SCT", "Left")]}.get(value, [])
        assert sides == expected, SIBLINGS[value]
        parsed = seg.get_segment_description(value).segmented_property_type
        assert parsed.value == type_item.CodeValue
    kidney = seg.get_segment_description(3).SegmentedPropertyTypeCodeSequence[0]
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == LEFT


def test_dicom_seg_refuses_series_without_uids(shared_data: Path, tmp_path: Path) -> None:
    """The CT series as anonymised has blank Study/Series UIDs a segmentation cannot reference."""
    folder = shared_data / "totalseg_examples" / "CT_dicom" / "example_ct_dicom"
    volume = load_volume(folder)
    labels = (volume.array[0] > 0).astype(np.uint8)
    with pytest.raises(ImageError, match="InstanceUID"):
        write_dicom_seg(labels, volume, {1: "body"}, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


def test_dicom_seg_refuses_grid_off_the_series(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "hippocampus_dicom" / "Study1" / "13_HCropVolume"
    volume = load_volume(folder)
    labels = np.ones(volume.shape, dtype=np.uint8)
    affine = volume.affine.copy()
    affine[0, 3] += 0.5  # half a voxel off the instances' pixel centres
    shifted = Volume(volume.array, affine, folder)
    with pytest.raises(ImageError, match="voxel grid"):
        write_dicom_seg(labels, shifted, {1: "x"}, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="no label"):
        write_dicom_seg(np.zeros_like(labels), volume, {1: "x"}, tmp_path / "seg.dcm")
