"""cxr_pipeline: MIMIC-CXR to classifiers and report generators, on Dagster and MLflow."""

__version__ = "0.1.0"
