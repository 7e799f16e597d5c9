"""The labeler on real radiology reports: the IU X-ray development half (even ids) against its MeSH headings.

The reports come from PyPI's torchxrayvision wheel (``pip download``, cached outside the
repository; their licence forbids copying them here). Under CI a failed download fails the
test; elsewhere it skips.
"""

from __future__ import annotations

import os
import tarfile

import pytest

from cxr_pipeline.reports import iu_xray
from cxr_pipeline.reports.labeler import label_reports


@pytest.fixture(scope="module")
def archive():
    try:
        return iu_xray.archive()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"IU X-ray reports not available: {e}")


@pytest.fixture(scope="module")
def development(archive):
    return list(iu_xray.development_reports(archive))


def test_only_even_ids_are_ever_opened(archive, monkeypatch):
    opened = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member.name if hasattr(member, "name") else member)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    reports = list(iu_xray.development_reports(archive))
    ids = [int(name.rsplit("/", 1)[-1].split(".")[0]) for name in opened]
    assert len(ids) > 1900 and all(i % 2 == 0 for i in ids)
    assert len(reports) > 1900 and all(r.id % 2 == 0 for r in reports)


def test_mesh_headings_map_to_chexpert_observations():
    def obs(*headings):
        return iu_xray.IUReport(2, "", "", headings).observations()

    assert obs("Hydropneumothorax/apex/right") == {"Pleural Effusion", "Pneumothorax"}
    assert obs("Opacity/lung/base/left") == {"Lung Opacity"}
    assert obs("Opacity/lung/upper lobe/left/round") == {"Lung Opacity", "Lung Lesion"}
    assert obs("Opacity/ribs/left") == set()  # a rib's opacity is not the lung's
    assert obs("Cardiac Shadow/enlarged/mild", "Cardiac Shadow/irregular") == {"Cardiomegaly"}
    assert obs("Calcified Granuloma/lung/upper lobe/right", "normal", "Spine/degenerative") == set()
    assert obs("Cicatrix/lung/apex/right") == {"Lung Opacity"}


def test_labeler_reads_real_reports(development):
    """Macro-F1 over the ten observations MeSH names, "positive" against "MeSH names it": the
    goal of issue #14 is 0.90 on this half (a negation-aware keyword labeler scores 0.82,
    ``benchmarks/bench_labeler.py``). Every observation stays above 0.80, so one cannot
    collapse behind a good average."""
    from sklearn.metrics import f1_score

    labels, bad = label_reports([r.text for r in development])
    assert bad == 0
    f1 = {}
    for name in iu_xray.FINDINGS10:
        truth = [name in r.observations() for r in development]
        pred = [row[name] == 1.0 for row in labels]
        f1[name] = f1_score(truth, pred)
    macro = sum(f1.values()) / len(f1)
    assert macro >= 0.90, f1
    assert min(f1.values()) > 0.80, f1
