"""Data shipped inside the package: target profiles and calibration/verification sets.

The repository's top-level `engines/` and `calib/` folders are the source of truth; this
package holds relative symlinks to them, so a source checkout, an editable install and a wheel
(setuptools copies the files the links point to) all read them through `importlib.resources`
from the same place: `builder._data`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PROFILES = "engines"
CALIBRATION = "calib"


def data_dir(name: str) -> Path:
    """The directory of one shipped data set (`PROFILES` or `CALIBRATION`) as a file path.

    pip always unpacks wheels, so the package lives on a file system; a zipped install would
    have no file paths to hand to the readers and is refused here rather than half-working.
    """
    path = resources.files(__name__) / name
    if not isinstance(path, Path):
        raise RuntimeError(f"builder is installed zipped ({path}); install it unpacked")
    return path
