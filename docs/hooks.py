"""MkDocs hook: regenerate the reference pages from the code before every build (``cxr_pipeline.reference``)."""

import warnings
from pathlib import Path


def on_pre_build(config, **kwargs) -> None:
    # loading the Definitions raises Dagster's beta/preview notices; they are not the docs' warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cxr_pipeline.reference import write_pages

        write_pages(Path(config["docs_dir"]) / "reference")
