"""The raw MIMIC-CXR dataset as an observable source asset."""

import dagster as dg

from cxr_pipeline.data.csvs import find_csv
from cxr_pipeline.data.mimic import CSV_STEMS, fingerprint
from cxr_pipeline.defs.keys import RAW
from cxr_pipeline.defs.needs import failure
from cxr_pipeline.defs.resources import CxrStorage


@dg.observable_source_asset(
    name=RAW,
    group_name="raw",
    description=(
        "MIMIC-CXR as released (CSVs, files/pNN/.../*.dcm or *.jpg, reports) under CXR_RAW_DIR. "
        "Its data version is a content fingerprint of the CSVs and the file listing, so downstream "
        "assets re-run only when the data really changes."
    ),
)
def raw_mimic_cxr(context: dg.AssetExecutionContext, storage: CxrStorage) -> dg.ObserveResult:
    root = storage.paths.raw
    if not root.is_dir():
        raise failure(f"{root}: dataset root does not exist (set CXR_RAW_DIR, or run `cxr-pipeline synth {root}`)")
    version = fingerprint(root)
    present = [stem for stem in CSV_STEMS if find_csv(root, stem) is not None]
    context.log.info(f"observed {root}: data version {version}")
    return dg.ObserveResult(
        data_version=dg.DataVersion(version),
        metadata={"root": dg.MetadataValue.path(str(root)), "csv_files": dg.MetadataValue.json(present)},
    )
