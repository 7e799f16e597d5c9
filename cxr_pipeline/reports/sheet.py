"""A picture of generated reports people can look at: for a few test studies, the image, the reference report, the
adapter's report and the classifiers' findings its prompt carried, side by side in one PNG.

Metrics say how often the words agree; a reader judging whether the model reads the image needs the image beside
the text. ``generated_reports`` logs one per materialization to MLflow and shows it in the Dagster catalog.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.data.shard_reader import Shards, load_images
from cxr_pipeline.files import png_figure
from cxr_pipeline.reports.prompts import INSTRUCTION

SHEET_STUDIES = 8


def prompt_findings(prompt: str) -> str:
    """What a prompt tells the model beyond the instruction: the classifiers' findings line, or that it has none."""
    extra = prompt.removeprefix(INSTRUCTION).strip()
    return extra or "none (instruction only)"


def sheet_rows(out: pl.DataFrame, n: int = SHEET_STUDIES) -> list[int]:
    """``n`` rows of the generated table spread over it (one image per study; the table is in ``dicom_id`` order, so
    the choice does not depend on the reports)."""
    first = out.with_row_index("_row").unique("study_id", keep="first", maintain_order=True)["_row"].to_numpy()
    if len(first) <= n:
        return [int(i) for i in first]
    return [int(first[i]) for i in np.linspace(0, len(first) - 1, n).round().astype(int)]


def report_sheet(path: Path, shards: Shards, out: pl.DataFrame, prompts: Sequence[str], n: int = SHEET_STUDIES) -> Path | None:
    """Write the sheet for ``n`` studies of ``out`` (``generate.test_split_reports``' table; ``prompts`` aligned with
    its rows) to ``path``; None when the table is empty. Images are read from ``shards`` at the adapter's size."""
    picked = sheet_rows(out, n)
    if not picked:
        return None
    rows = out[picked]
    images, read = load_images(shards, rows.select("dicom_id"))
    by_id = dict(zip(read["dicom_id"].to_list(), images.numpy(), strict=True))
    wrap = lambda text, width=58: "\n".join(textwrap.wrap(text or "(empty)", width)[:7])  # noqa: E731
    with png_figure(path, len(picked), 2, dpi=90, figsize=(9.5, 2.3 * len(picked)), width_ratios=[1, 3.4], squeeze=False) as (fig, axes):
        for k, (i, row) in enumerate(zip(picked, rows.iter_rows(named=True), strict=True)):
            image_ax, text_ax = axes[k]
            image_ax.imshow(by_id.get(row["dicom_id"], np.zeros((8, 8), np.uint8)), cmap="gray", vmin=0, vmax=255)
            image_ax.set_title(f"study {k + 1}", fontsize=8)
            image_ax.axis("off")
            text_ax.axis("off")
            text = (
                f"REFERENCE: {wrap(row['reference'])}\n\nGENERATED: {wrap(row['adapter'])}\n\n"
                f"FINDINGS IN THE PROMPT: {wrap(prompt_findings(prompts[i]), 70)}"
            )
            text_ax.text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace", transform=text_ax.transAxes)
        fig.suptitle(f"generated reports for {len(picked)} test studies (image at the adapter's input size)", fontsize=9)
    return path
