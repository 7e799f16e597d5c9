"""What every column of every table asset means: one line each, declared once.

The table IO manager attaches these to each materialization's column schema (the Columns panel of an
asset in Dagster's catalog) and ``reference`` writes them into the generated reference page. A column
family that repeats for every finding is one entry with ``{slug}`` in its name (the 14 CheXpert slugs
of ``labels``) and ``{finding}`` in its text; the subgroup metrics and the report metrics have families
of their own (``{metric}``, ``{system}``). A test materializes every table and fails on a column this
module does not describe.
"""

from __future__ import annotations

import re

from cxr_pipeline.labels import LABEL_BY_SLUG

_IDS = {
    "dicom_id": "MIMIC-CXR's image id (the DICOM's file name)",
    "subject_id": "the patient (MIMIC's subject_id)",
    "study_id": "the radiology study (one report) the image belongs to",
    "split": "train, validate or test: the official split, patients never in two",
}

_INTERVAL = {
    "{metric}_lo": "lower end of the 95% patient-bootstrap interval of {metric}",
    "{metric}_hi": "upper end of the 95% patient-bootstrap interval of {metric}",
}

TABLES: dict[str, dict[str, str]] = {
    "manifest": {
        **_IDS,
        "path": "the image file relative to the dataset root (files/pNN/pSSSSSSSS/sTTTTTTTT/DICOM_ID.dcm)",
        "view_position": "DICOM ViewPosition from the metadata CSV (PA, AP, LATERAL, ...)",
        "study_datetime": "StudyDate + StudyTime of the metadata CSV (MIMIC's shifted dates)",
        "label_source": "which automatic labeller the finding columns come from (chexpert or negbio)",
        "{slug}": "{finding} from the automatic labeller: 1 positive, 0 negative, -1 uncertain, null not mentioned",
        "radiologist_labelled": "the study is among the 687 test studies a radiologist labelled",
        "radiologist_{slug}": "{finding} as the radiologist labelled it (same codes; null where not labelled)",
        "findings": "the report's FINDINGS section (null when it has none)",
        "impression": "the report's IMPRESSION section (null when it has none)",
        "last_paragraph": "the report's last paragraph (the text used when neither section exists)",
        "has_report": "a report was found for the study",
    },
    "manifest_rejects": {
        "source": "the input file the row came from",
        "line": "the row's line in that file (the header is line 1)",
        "dicom_id": "the image id on that row, where it had one",
        "subject_id": "the patient id on that row, as written",
        "study_id": "the study id on that row, as written",
        "reason": "why the row could not be used",
    },
    "classifier_metrics": {
        "model": "per_pathology (one binary model per finding) or multilabel (one model, 14 outputs)",
        "pathology": "the CheXpert finding",
        "slug": "the finding's slug (column name elsewhere)",
        "test_labels": "which test labels the row is scored on: the automatic labeller's, or radiologist",
        "evaluable": "the test split has both classes, so the metrics exist",
        "reason": "why the row is not evaluable or not trainable (empty otherwise)",
        "n_test": "test images scored",
        "n_pos": "test images with the finding",
        "n_neg": "test images without it",
        "threshold": "the operating point, chosen on the validation split",
        "threshold_rule": "how the threshold was chosen (Youden's J on validation, or the fallback used)",
        "{metric}": "{metric} on the test split at the validation-chosen threshold",
        **_INTERVAL,
        "bootstrap_unit": "what the bootstrap resamples: patients (all of a patient's images together) or images",
        "bootstrap_skipped": "resamples skipped because they held only one class",
        "val_roc_auc": "ROC-AUC on the validation split (what the registry's champion is chosen on)",
        "best_epoch": "the epoch whose weights were kept (lowest validation loss)",
        "epochs_run": "epochs trained (early stopping may end before the configured number)",
        "train_seconds": "wall time of the training",
        "uncertain_policy": "how uncertain (-1) labels were treated in training (ignore, zeros, ones)",
        "blank_policy": "how blank labels were treated in training (ignore, zeros)",
        "reference_auc": "the 2024 course project's AUC for the finding (the floor to beat)",
        "calibration": "the map from the network's score to a probability, fitted on validate: platt, or none",
        "calibration_fit": "the calibration map and its parameters, or why there is none",
        "ece_binning": "how expected calibration error is binned",
        "ece_before": "expected calibration error on the test split of the network's own scores",
        "ece_after": "expected calibration error on the test split of the calibrated probabilities (what the registered model returns)",
        "brier_before": "Brier score on the test split of the network's own scores",
        "brier_after": "Brier score on the test split of the calibrated probabilities",
    },
    "external_validation": {
        "dataset": "the external set: chexpert, nih or padchest",
        "replica": "true when the set is the project's replica of that dataset's format (REPLICA.json in its folder), not the real one",
        "model": "per_pathology (one binary model per finding) or multilabel (one model, 14 outputs)",
        "registered": "the registered champion scored (name and version)",
        "pathology": "the CheXpert finding (the dataset's own labels harmonised: data.harmonisation.HARMONISATION)",
        "slug": "the finding's slug",
        "evaluable": "the external set has both classes for the finding, so the metrics exist",
        "reason": "why the row is not evaluable (empty otherwise)",
        "n_test": "external images scored for the finding (the model's label policy applied)",
        "n_pos": "external images with the finding",
        "n_neg": "external images without it",
        "n_patients": "external patients scored for the finding",
        "threshold": "the model's internal validation threshold (not re-chosen on the external set)",
        "threshold_rule": "where the threshold comes from",
        "calibration": "the model's calibration map (platt or none), fitted on the internal validation split",
        "ece_binning": "how expected calibration error is binned",
        "ece_before": "expected calibration error on the external set of the network's own scores",
        "ece_after": "expected calibration error on the external set of the calibrated probabilities",
        "brier_before": "Brier score on the external set of the network's own scores",
        "brier_after": "Brier score on the external set of the calibrated probabilities",
        "internal_{metric}": "{metric} of the same model on the internal test split (automatic labels; its run's metrics.json)",
        "{metric}_change": "{metric} on the external set minus on the internal test split",
        "{metric}": "{metric} on the external set at the internal validation threshold",
        **_INTERVAL,
        "bootstrap_unit": "what the bootstrap resamples: patients (all of a patient's images together) or images",
        "bootstrap_skipped": "resamples skipped because they held only one class",
        "bootstrap_resamples": "bootstrap resamples drawn",
    },
    "image_drift": {
        "window": "the window (a partition): external-<format> for an external set, pacs-NNNN for studies the PACS intake received",
        "n_window": "the window's patients compared, one frontal image each (at most max_window, drawn with the seed)",
        "n_reference": "training-split patients drawn as the reference, one frontal image each (never validate or test)",
        "drift_score": "the drift score: unbiased MMD² (with the kernel named in kernel; about 0 without drift, may dip below) "
        "between the window and the reference on the signal named in signal (outputs_mmd or features_mmd)",
        "p_value": "the drift score's permutation p-value ((1 + permutations at least as large) / (1 + permutations))",
        "signal": "what the alarm's test compares (image_drift.signal): outputs (the multi-label champion's calibrated "
        "probabilities, one per finding) or features (its backbone's pooled features)",
        "outputs_mmd": "unbiased MMD² between the multi-label champion's calibrated probabilities (all findings) on the window and on the reference",
        "outputs_p_value": "outputs_mmd's permutation p-value",
        "features_mmd": "unbiased MMD² between the multi-label champion's pooled backbone features on the window and on the reference",
        "features_p_value": "features_mmd's permutation p-value",
        "kernel": "the MMD kernel (image_drift.kernel)",
        "kernel_sigma": "the drift score's Gaussian kernel sigma (a multiscale kernel's middle one; empty for the energy distance)",
        "drifted": "the alarm: p_value below alpha and drift_score at least tolerance (the one signal alarmed on)",
        "alpha": "the alarm's level",
        "tolerance": "the smallest drift_score that alarms (image_drift.tolerance; by default the one validated for the signal and kernel)",
        "histogram_distance": "Jensen-Shannon distance (0 to 1) between the stored images' intensity histograms, padding left out",
        "bits_stored": "the window's most common bits stored per pixel of the source files (their headers; a PNG or JPG: 8 or 16)",
        "bits_stored_reference": "the reference's most common bits stored per pixel",
        "source_rows": "the window's median rows of the source files (their headers)",
        "source_rows_reference": "the reference's median source rows",
        "source_size_ratio": "source_rows over source_rows_reference (a resolution change shows here)",
        "mean_intensity_change": "the window's mean stored intensity (0-255, padding left out) minus the reference's",
        "share_PA": "the window's share of PA views",
        "share_AP": "the window's share of AP views",
        "share_lateral": "the window's share of lateral views",
        "share_PA_change": "the window's share of PA views minus the reference's",
        "share_AP_change": "the window's share of AP views minus the reference's",
        "share_lateral_change": "the window's share of lateral views minus the reference's",
        "model": "the champion whose outputs the row holds (registered name and version): the multi-label one, whose outputs or features give the window's drift score, or a per-finding one",
        "slug": "the finding's slug",
        "pathology": "the finding",
        "threshold": "the champion's served threshold for the finding (on the calibrated probability)",
        "output_ks": "Kolmogorov-Smirnov statistic between the finding's calibrated probabilities on the window and on the reference",
        "expected_auc": (
            "CBPE: the AUC the window is expected to have if its calibrated probabilities are right (no labels used); "
            "on a window that drifted that assumption is in doubt (under the benchmark's shifts that cost 0.05 AUC or more, "
            "its median error per finding on 100-patient windows was about 0.1)"
        ),
        "expected_sensitivity": "CBPE: the expected sensitivity at the threshold",
        "expected_specificity": "CBPE: the expected specificity at the threshold",
        "expected_prevalence": "CBPE: the mean calibrated probability (the expected share of positives)",
        "n_labelled": "window images with a definite label for the finding under the champion's policy (0: no labels)",
        "auc": "the measured AUC on the window's labels (null without both classes)",
        "sensitivity": "the measured sensitivity at the threshold",
        "specificity": "the measured specificity at the threshold",
        "prevalence": "the measured share of positives",
        "auc_estimate_error": "expected_auc minus the measured auc (CBPE's error on this window)",
    },
    "localization_metrics": {
        "dataset": "mimic (the internal test split) or nih (the NIH-format set's boxes, BBox_List_2017.csv)",
        "model": "per_pathology, multilabel, or baseline (a row that never sees the image)",
        "registered": "the registered champion scored (name and version); empty for a baseline",
        "method": "grad_cam (the model's map), mean_box (the finding's mean training box), box_prior (how often each place "
        "lies in a training box of the finding) or uniform_lungs (a flat map over the region of every training box)",
        "pathology": "the finding the boxes are of (the dataset's terms harmonised: data.boxes)",
        "slug": "the finding's slug",
        "n_images": "test images with a box of the finding (the images scored)",
        "n_patients": "their patients (the bootstrap resamples patients)",
        "n_boxes": "true boxes on those images",
        "detected_per_image": "boxes cut from the map at the level, per image (ChestX-ray8's thresholding)",
        "level": "the map threshold, a share of each map's maximum, chosen on the internal validate split (the mean IoBB "
        "accuracy over the five T); null for the baselines (one box whatever the level)",
        "level_from": "where the level was chosen: validate (n images), internal validate (an external set), or the default",
        "pointing": "pointing game: the share of images whose map maximum lies in a true box (a flat map's plateau counts the "
        "share of it inside)",
        "pointing_vs_mean_box": "pointing minus the mean-box baseline's on the same images (paired)",
        "pointing_vs_box_prior": "pointing minus the box prior's (where the finding's training boxes lie most often) on the same images (paired)",
        "training_boxes": "the training split's boxes of the finding a baseline is made from",
        "cam_grid": "cells a side of the map Grad-CAM weighs (the target block's output: the model's size over its stride)",
        "pointing_ceiling": "an upper bound on the pointing game of any map from that grid: the share of images where a true "
        "box holds a cell centre or reaches the half-cell band along the image's edge (where the upsampled maximum can lie)",
        **{
            f"iobb_{round(t * 100):02d}": f"ChestX-ray8 accuracy at T(IoBB) = {t}: the share of true boxes some box cut from the "
            f"map overlaps by more than {t} of its own area"
            for t in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
        **_INTERVAL,
    },
    "classifier_predictions": {
        "dicom_id": _IDS["dicom_id"],
        "split": _IDS["split"],
        "{slug}": "the per-pathology {finding} model's probability (null where it was not trained)",
    },
    "report_hints": {
        "dicom_id": _IDS["dicom_id"],
        "split": _IDS["split"],
        "fold": "the fold model that scored a training image (null: the final multi-label model)",
        "source": "out_of_fold (a fold model that never saw the image), held_out (the final model, other splits) or in_sample",
        "{slug}": "calibrated probability of {finding} given to the report prompts and the retrieval baseline",
        "threshold_{slug}": "the validation-chosen threshold carried through the same calibration map (for display: calls are call_{slug})",
        "call_{slug}": "whether {finding} is called: the network's score at or above its validation threshold, decided before "
        "calibration (read it, not {slug} against threshold_{slug}: at the map's clip the two can tie)",
    },
    "subgroup_metrics": {
        "view": "the predictions audited: test (the test split) or train_out_of_fold (fold models over training patients)",
        "labels": "the labels the view is scored on: the automatic labeller's, or radiologist",
        "model": "per_pathology or multilabel",
        "slug": "the finding",
        "attribute": "sex, age_band, race_group or insurance (MIMIC-IV)",
        "group": "the subgroup within the attribute ('not recorded': the attribute unknown); groups pooled until none of "
        "under min_patients patients is recoverable (vision.disclosure), names joined with ' + '; 'all': every group",
        "pooled": "the row pools several groups (each alone under min_patients, or taken in so that no difference isolates one)",
        "n_patients": "patients of the group in the view and label source (the same in every finding's and model's row)",
        "n_images": "images of the group in the view and label source (the same in every finding's and model's row; the rates "
        "read only those with a label for the finding under the model's policy)",
        "n_pos": "images of the group with the finding",
        "small_cell": "the view has fewer patients than min_patients: one row, 'all', with no value",
        "threshold": "the validation-chosen threshold the rates are read at (null out of fold: each fold model's own)",
        "prevalence": "n_pos / n_images: share of the group's images with the finding",
        "{metric}": "{metric} in the subgroup",
        **_INTERVAL,
        "tpr_gap_p": "two-sided Monte-Carlo p-value of no tpr_gap, (k+1)/(B+1): against random groups with as many patients "
        "with the finding (each patient's images together)",
        "tpr_gap_q": "Benjamini-Hochberg q-value of the tpr_gap among the tpr_gaps of its view, labels and model (a two-group attribute counted once)",
        "fpr_gap_p": "two-sided Monte-Carlo p-value of no fpr_gap, (k+1)/(B+1): against random groups with as many patients "
        "without the finding (each patient's images together)",
        "fpr_gap_q": "Benjamini-Hochberg q-value of the fpr_gap among the fpr_gaps of its view, labels and model (a two-group attribute counted once)",
    },
    "report_pairs": {
        **_IDS,
        "path": "the image file relative to the dataset root",
        "view_position": "DICOM ViewPosition",
        "radiologist_labelled": "the study is among the test studies a radiologist labelled",
        "radiologist_{slug}": "{finding} as the radiologist labelled the study (null where not labelled)",
        "text": "the target report text the adapter learns to write",
        "text_source": "which part of the report the text is (findings, impression, or both)",
        "words": "words in the text",
    },
    "generated_reports": {
        **{k: v for k, v in _IDS.items() if k != "split"},
        "reference": "the radiologist's report text (the target)",
        "radiologist_labelled": "the study is among the test studies a radiologist labelled",
        "radiologist_{slug}": "{finding} as the radiologist labelled the study (null where not labelled)",
        "{system}": "the report the {system} system wrote for the image",
        "evaluation": "the evaluation's name: which text is the reference and how many test images",
    },
    "report_metrics": {
        "system": "adapter, template or retrieval",
        "test_labels": "the labels clinical efficacy is scored against: the labeller's on the reference, or radiologist",
        "evaluation": "the evaluation's name: which text is the reference and how many test images",
        "n": "reports scored",
        "labeler": "the report labeler's version (clinical efficacy labels both sides with it)",
        "ce_macro": "how the macro clinical-efficacy F1 treats a finding absent from both sides",
        "bootstrap_unit": "what the intervals resample: patients (all of a patient's reports together), studies, or reports",
        "{metric}": "{metric} of the system's reports against the references",
        **_INTERVAL,
    },
}

# the families' members: metric names as the tables spell them, and the report systems
_METRIC = r"(?P<metric>[A-Za-z][A-Za-z0-9_]*?)"
_SYSTEM = r"(?P<system>adapter|template|retrieval)"
_SLUG = r"(?P<slug>" + "|".join(sorted(LABEL_BY_SLUG, key=len, reverse=True)) + ")"


def _pattern(name: str) -> re.Pattern:
    return re.compile(
        "^" + re.escape(name).replace(r"\{slug\}", _SLUG).replace(r"\{metric\}", _METRIC).replace(r"\{system\}", _SYSTEM) + "$"
    )


def describe(table: str, column: str) -> str | None:
    """One line on what ``column`` of ``table`` holds, or None when this module does not describe it.

    An exact entry wins; then a finding family (``{slug}``), then the system and metric families
    (a metric family matches any name, so it is tried last)."""
    entries = TABLES.get(table, {})
    if column in entries:
        return entries[column]
    families = sorted((k for k in entries if "{" in k), key=lambda k: ("{metric}" in k, "{system}" in k, -len(k)))
    for name in families:
        m = _pattern(name).match(column)
        if m:
            parts = m.groupdict()
            if "slug" in parts:
                parts["finding"] = LABEL_BY_SLUG[parts["slug"]]
            return entries[name].format(**parts)
    return None
