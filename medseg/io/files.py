"""File names, atomic writes and the user-error types of image I/O."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima", "")


class ImageError(ValueError):
    """An image file is missing, unreadable or unusable (a user error)."""


class WriteError(ImageError):
    """An output cannot be written: folder not writable, disk full (a user error)."""


def is_dicom_dir(path: Path) -> bool:
    """True when `path` is a folder holding DICOM files (a series)."""
    if not path.is_dir():
        return False
    for child in sorted(path.iterdir())[:20]:
        if child.is_file() and _has_dicom_magic(child):
            return True
    return False


def is_image_file(path: Path) -> bool:
    """True for files whose suffix medseg reads as an image."""
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix: ``scan.nii.gz`` -> ``scan``."""
    lower = name.lower()
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_suffix(name: str) -> str:
    """The suffix `strip_suffix` removes from a file name: ``a.nii.gz`` -> ``.nii.gz``."""
    return name[len(strip_suffix(name)) :]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix); rename it onto `path` on success.

    Readers never see a half-written file, and a crash leaves no partial output behind.
    """
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
        )
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs follow the umask
        os.replace(tmp, path)
    except OSError as err:  # disk full, quota, permissions: nothing partial is left behind
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False
