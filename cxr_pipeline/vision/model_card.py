"""A model card for every registered classifier version, generated from what the run recorded (never typed).

The sections follow Model Cards for Model Reporting (Mitchell et al., 2019): model details, intended use,
factors, metrics, evaluation data, training data, quantitative analyses, ethical considerations, caveats and
recommendations; and the CLAIM checklist items that apply to a classifier (data source and whether it is
synthetic, label definition and policy, partitions at the patient level, threshold and how it was chosen,
intervals and their unit, calibration, subgroup analysis, intended use and limitations). The card is written as
Markdown and JSON (the same content), logged beside the model in its MLflow run, and linked from the
registered version's description. No DICOM header text reaches it: counts, ids of models and runs only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr_pipeline.labels import slug
from cxr_pipeline.vision.calibration import ECE_BINNING, ECE_INTERVAL_NOTE
from cxr_pipeline.vision.calibration import describe as describe_calibration

CARD_DIR = "model_card"
CARD_MD, CARD_JSON = "model_card.md", "model_card.json"
REPLICA_MARKER = "REPLICA.json"  # written by data.synthetic.generate in the replica's root; MIMIC-CXR has none

INTENDED_USE = (
    "Research on chest radiograph classification: comparing recipes, architectures and label policies on "
    "MIMIC-CXR-style data, and as the source of classifier hints for the report model. Scores are calibrated "
    "probabilities on the validation split's population; calls are at a threshold chosen on validation."
)
NOT_FOR = [
    "Diagnosis, triage or any clinical decision about a patient: the model is not a medical device and was not validated prospectively.",
    "Populations, scanners or views unlike the training data (lateral views, paediatric patients, other hospitals) without external validation.",
    "Reading the calibrated probability as valid where the prevalence differs from the validation split's.",
]
LIMITATIONS = [
    "Labels come from an automatic report labeller (CheXpert's or NegBio's) and carry its errors; the radiologist-labelled studies are few.",
    "One image at a time: no prior studies, no lateral view, no clinical history.",
    "Intervals resample test patients; they do not cover a shift in population or equipment.",
]


def data_source(raw_dir: Path | None) -> dict[str, Any]:
    """Whether the model was trained on the project's replica (its marker in the raw root) or on real data."""
    marker = Path(raw_dir) / REPLICA_MARKER if raw_dir is not None else None
    if marker is not None and marker.exists():
        return {
            "kind": "replica",
            "note": "the project's MIMIC-CXR replica: synthetic radiographs with planted findings",
            **json.loads(marker.read_text()),
        }
    return {"kind": "MIMIC-CXR", "note": "the data under CXR_RAW_DIR (no replica marker)"}


def _interval(row: Mapping, metric: str) -> str:
    v, lo, hi = row.get(metric), row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if v is None or v != v:
        return "-"
    return f"{v:.3f}" + (f" [{lo:.3f}-{hi:.3f}]" if lo is not None and hi is not None else "")


def build_card(
    *,
    name: str,
    version: str,
    run_id: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    counts: Mapping[str, Mapping[str, int]],
    views: Sequence[str],
    manifest_version: str,
    source: Mapping[str, Any],
) -> tuple[str, dict]:
    """(Markdown, JSON) of one registered version. ``config``: the checkpoint's configuration
    (``vision.checkpoint.CheckpointConfig.as_json``); ``rows``: the metrics
    rows (one per finding and test label source); ``counts``: split -> {"images", "positives"} (per finding for a
    multi-label model: the total images only); ``views``: the views trained on."""

    labels = list(config["labels"])
    calibrations = {lab: config["calibration"].get(slug(lab)) for lab in labels}  # by finding name, either kind
    recipe = config.get("training_config", {})
    card = {
        "model_details": {
            "name": name,
            "version": version,
            "mlflow_run_id": run_id,
            "architecture": config.get("arch"),
            "input": f"{config.get('size')} x {config.get('size')} grey uint8, letterboxed (the shards' format)",
            "outputs": labels,
            "threshold_rule": "Youden's J on the validation split",
        },
        "intended_use": INTENDED_USE,
        "not_for": NOT_FOR,
        "factors": "Subgroups by sex, age band, race and insurance (MIMIC-IV) are audited by the subgroup_metrics asset, "
        "which adds this model's publishable gaps (small groups pooled) to its card when it runs.",
        "subgroups": {"status": "not yet audited: the subgroup_metrics asset adds them", "rows": []},
        "training_data": {
            "source": dict(source),
            "manifest_version": manifest_version,
            "views": list(views),
            "splits": {k: dict(v) for k, v in counts.items()},
            "split_level": "patient (no patient in two splits)",
            "label_policy": {"uncertain": recipe.get("uncertain"), "blank": recipe.get("blank")},
        },
        "metrics": [
            {
                k: r.get(k)
                for k in (
                    "pathology",
                    "test_labels",
                    "evaluable",
                    "reason",
                    "n_test",
                    "n_pos",
                    "roc_auc",
                    "roc_auc_lo",
                    "roc_auc_hi",
                    "sensitivity",
                    "specificity",
                    "f1",
                    "threshold",
                    "bootstrap_unit",
                    "ece_before",
                    "ece_before_lo",
                    "ece_before_hi",
                    "ece_after",
                    "ece_after_lo",
                    "ece_after_hi",
                    "brier_before",
                    "brier_after",
                )
            }  # fmt: skip
            for r in rows
        ],
        "calibration": {"binning": ECE_BINNING, "maps": {lab: describe_calibration(c) for lab, c in calibrations.items()}},
        "recipe": dict(recipe),
        "limitations": LIMITATIONS
        + ([f"Trained and tested on the replica only: {source['note']}."] if source.get("kind") == "replica" else []),
    }
    return _markdown(card), card


SUBGROUP_FIELDS = ("labels", "slug", "attribute", "group", "n_patients", "n_pos", "tpr", "tpr_gap", "tpr_gap_lo", "tpr_gap_hi", "tpr_gap_q")
SUBGROUP_SHOWN = 12


def with_subgroups(card: dict, table, audit_run: str, skipped: str = "") -> tuple[str, dict]:
    """The card with its **publishable** subgroup gaps added (``table``: ``vision.subgroups.publishable`` of the audit,
    this model's rows on the test split: small groups already pooled, so no cell a data-use agreement forbids):
    (Markdown, JSON). The JSON keeps every row; the Markdown the largest TPR gaps by size."""
    import polars as pl

    card = dict(card)
    if skipped:
        card["subgroups"] = {"status": f"not audited: {skipped}", "audit_run": audit_run, "rows": []}
        return _markdown(card), card
    rows = table.filter(pl.col("tpr_gap").is_not_null()).select([c for c in SUBGROUP_FIELDS if c in table.columns])
    rows = rows.sort(pl.col("tpr_gap").abs(), descending=True)
    card["subgroups"] = {
        "status": "audited on the test split (subgroup_metrics; patient-bootstrap intervals, BH q-values)",
        "audit_run": audit_run,
        "rows": rows.to_dicts(),
    }
    return _markdown(card), card


def _subgroup_lines(sub: Mapping) -> list[str]:
    rows = sub.get("rows") or []
    lines = ["## Subgroup gaps (test split; publishable: small groups pooled)", f"{sub.get('status', '')}."]
    if not rows:
        return lines
    lines += [
        "",
        f"The {min(len(rows), SUBGROUP_SHOWN)} largest true-positive-rate gaps to the other patients of {len(rows)} (every row in the JSON):",
        "",
        "| labels | finding | attribute | group | patients | TPR | TPR gap [95% CI] | q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[:SUBGROUP_SHOWN]:
        tpr = "-" if r.get("tpr") is None else f"{r['tpr']:.3f}"
        q = "-" if r.get("tpr_gap_q") is None else f"{r['tpr_gap_q']:.3f}"
        gap = (
            f"{r['tpr_gap']:+.3f} [{r['tpr_gap_lo']:+.3f}, {r['tpr_gap_hi']:+.3f}]"
            if r.get("tpr_gap_lo") is not None
            else f"{r['tpr_gap']:+.3f}"
        )
        lines.append(
            f"| {r.get('labels')} | {r.get('slug')} | {r.get('attribute')} | {r.get('group')} | {r.get('n_patients')} | {tpr} | {gap} | {q} |"
        )
    return lines


def _markdown(card: dict) -> str:
    d, t = card["model_details"], card["training_data"]
    lines = [
        f"# Model card: {d['name']} v{d['version']}",
        "",
        "Generated by cxr_pipeline from the run that trained it (`vision/model_card.py`); the JSON beside it holds the same.",
        "",
        "## Model details",
        f"- Architecture: {d['architecture']}; input {d['input']}; outputs: {', '.join(map(str, d['outputs']))}",
        f"- MLflow run: `{d['mlflow_run_id']}`; threshold: {d['threshold_rule']}",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "Not for:",
        *[f"- {x}" for x in card["not_for"]],
        "",
        "## Training data",
        f"- Source: **{t['source']['kind']}** ({t['source']['note']})",
        f"- Manifest version: `{t['manifest_version']}`; views: {', '.join(t['views']) or '-'}; splits at the {t['split_level']}",
        "- Label policy: uncertain as {uncertain}, blank as {blank}".format(**t["label_policy"]),
        "",
        "| split | images | positives |",
        "|---|---|---|",
        *[f"| {s} | {c.get('images', '-')} | {c.get('positives', '-')} |" for s, c in t["splits"].items()],
        "",
        "## Metrics (test split; 95% bootstrap intervals)",
        "",
        "| finding | test labels | n (pos) | ROC-AUC | sensitivity | specificity | ECE before | ECE after | Brier before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in card["metrics"]:
        if not r.get("evaluable"):
            lines.append(
                f"| {r['pathology']} | {r['test_labels']} | {r.get('n_test')} ({r.get('n_pos')}) | not evaluable: {r.get('reason')} | | | | | |"
            )
            continue
        brier = "-" if r.get("brier_before") is None else f"{r['brier_before']:.3f} -> {r['brier_after']:.3f}"
        lines.append(
            f"| {r['pathology']} | {r['test_labels']} | {r['n_test']} ({r['n_pos']}) | {_interval(r, 'roc_auc')} | "
            f"{_interval(r, 'sensitivity')} | {_interval(r, 'specificity')} | {_interval(r, 'ece_before')} | {_interval(r, 'ece_after')} | {brier} |"
        )
    lines += [
        "",
        f"Intervals resample {card['metrics'][0].get('bootstrap_unit') or 'patients'}s; ECE: {card['calibration']['binning']}; "
        + ECE_INTERVAL_NOTE
        + ".",
        "",
        "## Calibration (fitted on validate)",
        *[f"- {lab}: {desc}" for lab, desc in card["calibration"]["maps"].items()],
        "",
        "## Factors",
        card["factors"],
        "",
        *_subgroup_lines(card.get("subgroups") or {}),
        "",
        "## Recipe",
        "```json",
        json.dumps(card["recipe"], indent=1, sort_keys=True, default=str),
        "```",
        "",
        "## Limitations and recommendations",
        *[f"- {x}" for x in card["limitations"]],
        "",
    ]
    return "\n".join(lines)


EXAMPLE_NOTE = (
    '!!! note "A generated card"\n'
    "    This page is a model card exactly as the pipeline writes it (`vision/model_card.py`), for one registered version "
    "of the demo's replica, after the subgroup audit added its gaps: {provenance}. Its JSON is "
    "`docs/model-card-example.json`; the test suite re-renders this page from it with the current code. Regenerate with "
    '`python -m cxr_pipeline.vision.model_card $CXR_HOME/assets/classifier/<finding>/model_card.json "<provenance>"`.\n'
)


def example_page(card: dict, provenance: str) -> str:
    """The documentation's example card: the card's Markdown with a note on where it came from after its title."""
    title, rest = _markdown(card).split("\n", 1)
    return f"{title}\n\n{EXAMPLE_NOTE.format(provenance=provenance)}{rest}"


if __name__ == "__main__":  # python -m cxr_pipeline.vision.model_card CARD_JSON PROVENANCE: writes the docs' example
    import sys

    docs = Path(__file__).resolve().parents[2] / "docs"
    kept = json.loads(Path(sys.argv[1]).read_text())
    example = {"provenance": sys.argv[2], "card": kept["card"]}
    (docs / "model-card-example.json").write_text(json.dumps(example, indent=1, default=str) + "\n")
    (docs / "model-card-example.md").write_text(example_page(kept["card"], sys.argv[2]))
