"""The manifest policy, rule by rule, and what happens to bad input."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import polars as pl
import pytest

from cxr_pipeline.data.csvs import DatasetError
from cxr_pipeline.data.mimic import RADIOLOGIST_COLUMNS, ManifestPolicy, build_manifest
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.labels import LABELS, SLUGS

ALL = ManifestPolicy(views=(), one_image_per_subject=False)


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        r = list(csv.reader(f))
    return r[0], r[1:]


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(buf.getvalue())
    else:
        path.write_text(buf.getvalue())


def test_default_policy_pa_one_per_subject_earliest(replica):
    res = build_manifest(replica)
    m = res.manifest
    assert m.height > 0 and set(m["view_position"]) == {"PA"}
    assert m["subject_id"].n_unique() == m.height
    everything = build_manifest(replica, ManifestPolicy(one_image_per_subject=False)).manifest
    first = everything.sort("study_datetime", "study_id", "dicom_id").group_by("subject_id", maintain_order=True).first()
    assert dict(zip(first["subject_id"], first["dicom_id"], strict=True)) == dict(zip(m["subject_id"], m["dicom_id"], strict=True))
    assert res.stats["excluded_by_view"] > 0 and res.stats["excluded_one_per_subject"] > 0
    assert res.rejects.height == 0


def test_all_views_and_unknown_for_blank(replica):
    m = build_manifest(replica, ALL).manifest
    assert {"PA", "AP", "LATERAL"} <= set(m["view_position"])
    meta = pl.read_csv(replica / "mimic-cxr-2.0.0-metadata.csv.gz", infer_schema=False)
    assert m.height == meta.height
    n_blank = meta["ViewPosition"].is_null().sum()
    assert (m["view_position"] == "UNKNOWN").sum() == n_blank


def test_columns_types_and_reports(replica):
    m = build_manifest(replica, ALL).manifest
    for col in ("dicom_id", "subject_id", "study_id", "path", "view_position", "study_datetime", "split", "findings", "impression"):
        assert col in m.columns
    assert m["study_datetime"].dtype == pl.Datetime("ms")
    assert m["study_datetime"].dt.year().min() >= 2100
    assert set(m["atelectasis"].drop_nulls().unique()) <= {1, 0, -1}
    assert m["has_report"].all()
    assert (m["findings"].is_not_null() | m["impression"].is_not_null() | m["last_paragraph"].is_not_null()).all()


def test_splits_are_patient_disjoint_and_official(replica):
    m = build_manifest(replica, ALL).manifest
    assert m.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    official = pl.read_csv(replica / "mimic-cxr-2.0.0-split.csv.gz", infer_schema=False).select(
        "dicom_id", pl.col("split").alias("official")
    )
    joined = m.join(official, on="dicom_id")
    assert (joined["split"] == joined["official"]).all()


def test_radiologist_labels_are_kept_apart_under_the_real_header(replica_copy):
    rad_path = replica_copy / "mimic-cxr-2.1.0-test-set-labeled.csv"
    header, rows = read_rows(rad_path)
    # the release's header: study_id only, "Airspace Opacity" for Lung Opacity
    assert header[0] == "study_id" and "subject_id" not in header
    assert "Airspace Opacity" in header and "Lung Opacity" not in header
    col = header.index("Pneumothorax")
    for r in rows:
        r[col] = "1.0"  # a value the automatic labels do not have for most of these studies
    auto = build_manifest(replica_copy, ManifestPolicy(views=(), one_image_per_subject=False, radiologist_test_labels=False))
    split = dict(zip(auto.manifest["study_id"].to_list(), auto.manifest["split"].to_list(), strict=True))
    train_study = next(s for s, sp in split.items() if sp == "train")
    write_rows(rad_path, header, [*rows, [str(train_study), *["1.0"] * (len(header) - 1)]])
    result = build_manifest(replica_copy, ALL)
    m = result.manifest
    test = m.filter(pl.col("split") == "test")
    labelled = test.filter(pl.col("radiologist_labelled"))
    assert 0 < labelled["study_id"].n_unique() < test["study_id"].n_unique()  # a subset of the test studies
    assert labelled["study_id"].n_unique() == len(rows) == result.stats["radiologist_studies"] - 1
    assert (labelled["radiologist_pneumothorax"] == 1).all()
    by_study = {int(r[0]): r[header.index("Airspace Opacity")] for r in rows}
    got = dict(zip(labelled["study_id"].to_list(), labelled["radiologist_lung_opacity"].to_list(), strict=True))
    assert all(got[s] == ({"1.0": 1, "0.0": 0, "-1.0": -1}.get(by_study[s])) for s in got)
    # the automatic labels stay in the 14 label columns, for every row
    assert m.select(SLUGS).equals(auto.manifest.select(SLUGS)) and (m["label_source"] == "chexpert").all()
    # a labelled study outside the test split is counted, never used
    assert result.stats["radiologist_studies_outside_test"] == 1
    others = m.filter(pl.col("split") != "test")
    assert (
        not others["radiologist_labelled"].any()
        and others.select(RADIOLOGIST_COLUMNS).null_count().sum_horizontal()[0] == 14 * others.height
    )
    # the CheXpert name is accepted as well
    write_rows(rad_path, [("Lung Opacity" if h == "Airspace Opacity" else h) for h in header], rows)
    assert build_manifest(replica_copy, ALL).manifest["radiologist_labelled"].sum() == labelled.height
    gone = header.index("Airspace Opacity")
    write_rows(rad_path, [h for h in header if h != "Airspace Opacity"], [r[:gone] + r[gone + 1 :] for r in rows])
    with pytest.raises(DatasetError, match="test-set-labeled.csv: missing column.*Lung Opacity or Airspace Opacity"):
        build_manifest(replica_copy, ALL)


def test_negbio_label_source(replica):
    chex = build_manifest(replica, ALL).manifest
    neg = build_manifest(
        replica, ManifestPolicy(views=(), one_image_per_subject=False, label_source="negbio", radiologist_test_labels=False)
    ).manifest
    assert (neg["label_source"] == "negbio").all()
    j = chex.join(neg, on="dicom_id", suffix="_n").filter(pl.col("split") != "test")
    assert any(
        (j[c] != j[f"{c}_n"]).fill_null(False).any() or (j[c].is_null() != j[f"{c}_n"].is_null()).any()
        for c in ("atelectasis", "edema", "pneumonia", "lung_opacity", "pleural_effusion", "cardiomegaly")
    )
    with pytest.raises(ValueError, match="label_source"):
        ManifestPolicy(label_source="radiologist")


def test_hash_split_without_split_file_is_deterministic_and_patient_level(replica_copy):
    (replica_copy / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    a = build_manifest(replica_copy, ALL)
    b = build_manifest(replica_copy, ALL)
    assert a.stats["split_from_file"] == 0
    assert a.manifest.select("dicom_id", "split").equals(b.manifest.select("dicom_id", "split"))
    assert a.manifest.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(a.manifest["split"]) <= {"train", "validate", "test"}


def test_patient_in_two_splits_is_rejected_not_leaked(replica_copy):
    path = replica_copy / "mimic-cxr-2.0.0-split.csv.gz"
    header, rows = read_rows(path)
    subject = rows[0][header.index("subject_id")]
    mine = [r for r in rows if r[header.index("subject_id")] == subject]
    assert len(mine) >= 2
    mine[-1][header.index("split")] = "test" if mine[0][header.index("split")] != "test" else "train"
    write_rows(path, header, rows)
    res = build_manifest(replica_copy, ALL)
    assert int(subject) not in res.manifest["subject_id"].to_list()
    leaked = res.rejects.filter(pl.col("subject_id") == subject)
    assert leaked.height == len(mine) and leaked["reason"].str.contains("several splits").all()


def test_bad_rows_go_to_rejects_with_file_line_and_reason(replica_copy):
    rec_path = replica_copy / "cxr-record-list.csv.gz"
    header, rows = read_rows(rec_path)
    i_path, i_did = header.index("path"), header.index("dicom_id")
    outside = rows[0][i_did]
    rows[0][i_path] = "../../etc/passwd"
    dup = rows[1][i_did]
    rows.append(list(rows[1]))
    missing_file = rows[2][i_did]
    rows[2][i_path] = rows[2][i_path].replace(".dcm", ".missing.dcm").replace(rows[2][i_did] + ".", rows[2][i_did] + ".")
    write_rows(rec_path, header, rows)
    # the file of row 3 disappears from disk
    gone = rows[3][i_did]
    (replica_copy / rows[3][i_path]).parent.unlink()  # a symlinked study folder
    meta_path = replica_copy / "mimic-cxr-2.0.0-metadata.csv.gz"
    mh, mrows = read_rows(meta_path)
    bad_date = mrows[5][mh.index("dicom_id")]
    mrows[5][mh.index("StudyDate")] = "2180-13-45"
    write_rows(meta_path, mh, mrows)
    lab_path = replica_copy / "mimic-cxr-2.0.0-chexpert.csv.gz"
    lh, lrows = read_rows(lab_path)
    touched = {r[header.index("study_id")] for r in rows[:6]} | {r[mh.index("study_id")] for r in mrows[:6]}
    k = next(i for i, r in enumerate(lrows) if r[lh.index("study_id")] not in touched)
    lrows[k][lh.index("Edema")] = "2.0"
    bad_study = lrows[k][lh.index("study_id")]
    write_rows(lab_path, lh, lrows)

    res = build_manifest(replica_copy, ALL)
    rej = res.rejects
    by_id = {r["dicom_id"]: r for r in rej.iter_rows(named=True) if r["dicom_id"]}
    assert by_id[outside]["reason"] == "path outside the dataset root" and by_id[outside]["line"] == 2
    assert by_id[outside]["source"] == "cxr-record-list.csv.gz"
    assert rej.filter(pl.col("dicom_id") == dup).height == 2
    assert "listed twice" in by_id[dup]["reason"]
    assert by_id[missing_file]["reason"] == "image file missing"
    assert by_id[bad_date]["reason"].startswith("unparseable StudyDate")
    assert gone in by_id and by_id[gone]["reason"] == "image file missing"
    label_rej = rej.filter(pl.col("source") == "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert (
        label_rej.height == 1 and "unknown label value '2.0' in column 'Edema'" in label_rej["reason"][0] and label_rej["line"][0] == k + 2
    )
    assert rej.filter((pl.col("study_id") == bad_study) & pl.col("reason").str.starts_with("labels rejected")).height >= 1
    kept = set(res.manifest["dicom_id"])
    assert not kept & {outside, dup, missing_file, bad_date, gone}
    assert int(bad_study) not in res.manifest["study_id"].to_list()
    # nothing silently dropped: every record-list row is kept, rejected or excluded
    n_rows = len(rows)
    accounted = res.manifest.height + rej.filter(pl.col("source") == "cxr-record-list.csv.gz").height
    assert accounted == n_rows


def test_missing_required_csv_or_column_names_it(replica_copy):
    (replica_copy / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv\.gz"):
        build_manifest(replica_copy)
    meta_path = replica_copy / "mimic-cxr-2.0.0-metadata.csv.gz"
    header, rows = read_rows(meta_path)
    i = header.index("ViewPosition")
    write_rows(meta_path, [h for j, h in enumerate(header) if j != i], [[v for j, v in enumerate(r) if j != i] for r in rows])
    with pytest.raises(DatasetError, match="metadata.*ViewPosition"):
        build_manifest(replica_copy, ManifestPolicy(label_source="negbio"))
    with pytest.raises(DatasetError, match="does not exist"):
        build_manifest(replica_copy / "nope")


def test_truncated_gzip_names_the_file(replica_copy):
    path = replica_copy / "mimic-cxr-2.0.0-chexpert.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(DatasetError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv\.gz: cannot be read"):
        build_manifest(replica_copy)


def test_plain_csv_extra_columns_and_any_column_order(replica_copy):
    path = replica_copy / "mimic-cxr-2.0.0-split.csv.gz"
    header, rows = read_rows(path)
    order = [header.index(c) for c in ("split", "subject_id", "dicom_id", "study_id")]
    path.unlink()
    write_rows(
        replica_copy / "mimic-cxr-2.0.0-split.csv", [header[i] for i in order] + ["extra"], [[r[i] for i in order] + ["x"] for r in rows]
    )
    a = build_manifest(replica_copy, ALL)
    assert a.stats["split_from_file"] == 1 and a.rejects.height == 0 and a.manifest.height > 0


def test_reports_read_from_zip_when_not_extracted(replica_copy):
    for txt in (replica_copy / "files").rglob("*.txt"):
        txt.unlink()
    m = build_manifest(replica_copy, ALL).manifest
    assert m["has_report"].all() and m["impression"].is_not_null().sum() > 0


def test_jpg_release_without_record_list(tmp_path):
    out = tmp_path / "jpg"
    generate(SynthConfig(patients=6, seed=5, source_rows=64, fmt="jpg"), out)
    res = build_manifest(out, ALL)
    assert res.rejects.height == 0 and res.manifest.height > 0
    assert res.manifest["path"].str.ends_with(".jpg").all()
    assert all((out / p).is_file() for p in res.manifest["path"])


def test_labels_kept_as_given(replica):
    m = build_manifest(replica, ALL).manifest
    chex = pl.read_csv(replica / "mimic-cxr-2.0.0-chexpert.csv.gz", infer_schema=False)
    row = m.filter(pl.col("split") == "train").row(0, named=True)
    src = chex.filter(pl.col("study_id") == str(row["study_id"])).row(0, named=True)
    for lab in LABELS:
        col = lab.lower().replace(" ", "_")
        want = None if src[lab] is None else int(float(src[lab]))
        assert row[col] == want, lab
