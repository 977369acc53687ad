"""Conventional colours and DICOM codes of common anatomy, looked up by label name.

Colours follow 3D Slicer's GenericAnatomyColors table (``Base/Logic/Resources/ColorFiles/
GenericAnatomyColors.txt``) where it has the structure; the hippocampus takes FreeSurfer's
colour, and the few structures neither covers have hand-picked ones. Codes are SNOMED CT
(scheme ``SCT``) concepts from DICOM CID 7150/7151 ("Segmentation Property Categories/Types"),
the ones 3D Slicer's terminology and highdicom use. Labels with no entry get a stable colour from
`palette_color` and the generic "Tissue" codes. A name's side (``kidney_left``, ``Right Lung``)
is the SNOMED laterality modifier of its type (DICOM CID 244), found by `laterality`. Distinct
colours for the labels of one map (siblings such as the vertebrae) are `colors.label_colors`.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Code:
    """A coded concept (the three parts of a DICOM code sequence item)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Anatomy:
    """What a known label name stands for.

    Attributes:
        color: display colour, RGB 0-255.
        category: segmented property category (Tissue, Anatomical Structure, ...).
        type: segmented property type (Liver, Spleen, ...).
    """

    color: RGB
    category: Code
    type: Code


TISSUE = Code("85756007", "SCT", "Tissue")
STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
GENERIC = Anatomy((128, 174, 128), TISSUE, TISSUE)
# Laterality modifiers (DICOM CID 244; meanings as 3D Slicer's terminology spells them).
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
RIGHT_AND_LEFT = Code("51440002", "SCT", "Right and left")
_BOTH_SIDES_WORDS = frozenset({"bilateral", "both"})


def _entry(color: RGB, category: Code, value: str, meaning: str) -> Anatomy:
    return Anatomy(color, category, Code(value, "SCT", meaning))


_HIPPOCAMPUS = _entry((220, 216, 20), STRUCTURE, "5366008", "Hippocampus")
_KIDNEY = _entry((185, 102, 83), STRUCTURE, "64033007", "Kidney")
_LUNG = _entry((197, 165, 145), STRUCTURE, "39607008", "Lung")
_TUMOUR = _entry((144, 238, 144), ABNORMAL, "108369006", "Neoplasm")
_GREY = _entry((200, 200, 235), TISSUE, "389081007", "Gray matter")
_VERTEBRA = _entry((226, 202, 134), STRUCTURE, "51282000", "Vertebra")
_BLADDER = _entry((222, 154, 132), STRUCTURE, "89837001", "Urinary bladder")
_SMALL_BOWEL = _entry((205, 167, 142), STRUCTURE, "30315005", "Small intestine")

# Keys are lower case with words separated by single spaces (see `normalize_name`).
ANATOMY: dict[str, Anatomy] = {
    "tissue": GENERIC,
    "hippocampus": _HIPPOCAMPUS,
    # MSD Task04 names: the hippocampus head (anterior) and body and tail (posterior).
    "anterior": _HIPPOCAMPUS,
    "posterior": _entry((80, 160, 255), STRUCTURE, "5366008", "Hippocampus"),
    "brain": _entry((250, 250, 225), STRUCTURE, "12738006", "Brain"),
    "grey matter": _GREY,
    "gray matter": _GREY,
    "white matter": _entry((250, 250, 210), TISSUE, "389080008", "White matter"),
    "spinal cord": _entry((244, 214, 49), STRUCTURE, "2748008", "Spinal cord"),
    "bone": _entry((241, 214, 145), TISSUE, "272673000", "Bone"),
    "skull": _entry((241, 213, 144), STRUCTURE, "89546000", "Skull"),
    "vertebra": _VERTEBRA,
    "vertebrae": _VERTEBRA,
    "spine": _entry((226, 202, 134), STRUCTURE, "421060004", "Spine"),
    "rib": _entry((253, 232, 158), STRUCTURE, "113197003", "Rib"),
    "ribs": _entry((253, 232, 158), STRUCTURE, "113197003", "Rib"),
    "muscle": _entry((192, 104, 88), TISSUE, "71616004", "Muscle"),
    "fat": _entry((230, 220, 70), TISSUE, "256674009", "Fat"),
    "skin": _entry((177, 122, 101), TISSUE, "39937001", "Skin"),
    "heart": _entry((206, 110, 84), STRUCTURE, "80891009", "Heart"),
    "aorta": _entry((224, 97, 76), STRUCTURE, "15825003", "Aorta"),
    "artery": _entry((216, 101, 79), STRUCTURE, "51114001", "Artery"),
    "vein": _entry((0, 151, 206), STRUCTURE, "29092000", "Vein"),
    "lung": _LUNG,
    "lungs": _LUNG,
    "trachea": _entry((182, 228, 255), STRUCTURE, "44567001", "Trachea"),
    "esophagus": _entry((211, 171, 143), STRUCTURE, "32849002", "Esophagus"),
    "oesophagus": _entry((211, 171, 143), STRUCTURE, "32849002", "Esophagus"),
    "thyroid": _entry((62, 162, 114), STRUCTURE, "69748006", "Thyroid gland"),
    "liver": _entry((221, 130, 101), STRUCTURE, "10200004", "Liver"),
    "spleen": _entry((157, 108, 162), STRUCTURE, "78961009", "Spleen"),
    "kidney": _KIDNEY,
    "kidneys": _KIDNEY,
    "gallbladder": _entry((139, 150, 98), STRUCTURE, "28231008", "Gallbladder"),
    "pancreas": _entry((249, 180, 111), STRUCTURE, "15776009", "Pancreas"),
    "stomach": _entry((216, 132, 105), STRUCTURE, "69695003", "Stomach"),
    "duodenum": _entry((255, 253, 229), STRUCTURE, "38848004", "Duodenum"),
    "small bowel": _SMALL_BOWEL,
    "small intestine": _SMALL_BOWEL,
    "colon": _entry((204, 168, 143), STRUCTURE, "71854001", "Colon"),
    "bladder": _BLADDER,
    "urinary bladder": _BLADDER,
    "adrenal gland": _entry((249, 186, 150), STRUCTURE, "23451007", "Adrenal gland"),
    "prostate": _entry((230, 158, 140), STRUCTURE, "41216001", "Prostate"),
    "tumour": _TUMOUR,
    "tumor": _TUMOUR,
    "neoplasm": _TUMOUR,
    "mass": _entry((144, 238, 144), ABNORMAL, "4147007", "Mass"),
    "lesion": _entry((144, 238, 144), ABNORMAL, "52988006", "Lesion"),
    "cyst": _entry((205, 205, 100), ABNORMAL, "367643001", "Cyst"),
    "edema": _entry((140, 224, 228), ABNORMAL, "79654002", "Edema"),
    "oedema": _entry((140, 224, 228), ABNORMAL, "79654002", "Edema"),
    "necrosis": _entry((216, 191, 216), ABNORMAL, "6574001", "Necrosis"),
}

# Words that name an anatomical structure only when they are the whole label name.
_WHOLE_NAME_ONLY = frozenset({"anterior", "posterior"})
_BY_LENGTH = sorted((k for k in ANATOMY if k not in _WHOLE_NAME_ONLY), key=len, reverse=True)

# Slicer's GenericAnatomyColors "region_0" to "region_15": distinct colours for unknown labels.
_PALETTE: tuple[RGB, ...] = (
    (185, 232, 61),
    (0, 226, 255),
    (251, 159, 255),
    (230, 169, 29),
    (0, 194, 113),
    (104, 160, 249),
    (221, 108, 158),
    (137, 142, 0),
    (230, 70, 0),
    (0, 147, 0),
    (0, 147, 248),
    (231, 0, 206),
    (129, 78, 0),
    (0, 116, 0),
    (0, 0, 255),
    (157, 0, 0),
)
_GOLDEN_RATIO = 0.618033988749895


def normalize_name(name: str) -> str:
    """Lower case, with ``_``/``-`` and runs of spaces turned into single spaces."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower())).strip()


def lookup_anatomy(name: str) -> Anatomy | None:
    """The table entry for a label name, or None when it names nothing known.

    The whole name is tried first, then the longest known term it contains as whole words, so
    ``kidney_left`` and ``Left Kidney`` both find ``kidney`` and ``lung_upper_lobe_left`` finds
    ``lung``.
    """
    key = normalize_name(name)
    if key in ANATOMY:
        return ANATOMY[key]
    padded = f" {key} "
    for term in _BY_LENGTH:
        if f" {term} " in padded:
            return ANATOMY[term]
    return None


def laterality(name: str) -> Code | None:
    """The side a label name states, as a SNOMED modifier; None when it states none.

    Whole words only (after `normalize_name`), so ``kidney_left``, ``Left Kidney``,
    ``rib_left_3`` and ``lung_upper_lobe_left`` are Left; a name with both sides, or with
    "bilateral"/"both", is Right and left. ``leftover`` states no side. A chamber's name
    (``heart_atrium_left``) gives the side of its organ's code (Heart, Left): the table has no
    chamber codes.
    """
    words = set(normalize_name(name).split())
    left, right = "left" in words, "right" in words
    if (left and right) or words & _BOTH_SIDES_WORDS:
        return RIGHT_AND_LEFT
    if left:
        return LEFT
    return RIGHT if right else None


def palette_color(value: int) -> RGB:
    """A colour for a label value with no known anatomy; the same value always gets the same one.

    Values 1-16 take Slicer's 16 "region" colours; larger values step the hue by the golden ratio.
    """
    if 1 <= value <= len(_PALETTE):
        return _PALETTE[value - 1]
    hue = (value * _GOLDEN_RATIO) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)
