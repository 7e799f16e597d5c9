"""Registered classifiers as a user meets them: MLflow's loader, ``mlflow models serve``, ``cxr-pipeline predict``.

The models here are untrained (random weights at 32 px): these tests are about the
plumbing a user depends on (what is registered loads, predicts the same in-process
and over HTTP, decodes real radiographs as the shards do); trained models are
exercised the same way in ``test_definitions``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from safetensors.torch import save_file

from cxr_pipeline.cli import main
from cxr_pipeline.data.dicom import prepare, without_window
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.tracking import get_client, tracked_run
from cxr_pipeline.vision.checkpoint import (
    MODEL_ARTIFACT,
    ClassifierFiles,
    load_checkpoint,
    load_registered,
    register,
)
from cxr_pipeline.vision.models import build_model
from cxr_pipeline.vision.serving import pick_cases
from cxr_pipeline_tests import services

DATA = Path(pydicom.__file__).resolve().parent.parent / "data_store" / "data"
REAL = [DATA / "RG1_UNCR.dcm", DATA / "RG3_UNCR.dcm"]  # real CR chest radiographs, MONOCHROME1
SIZE = 32


FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "registered_af43cf9"


def test_models_registered_before_format_2_load_by_alias_as_todays_do(registry, tmp_path):
    """MLflow model folders exactly as commit af43cf9 logged them (``fixtures/registered_af43cf9``: its MLmodel,
    code file, artifact key and checkpoint ``config.json``, calibrated, the recipe inside; made by that commit's
    ``fit.save_checkpoint`` + ``serving.save_pyfunc``, weights left out for size and written back here), registered
    as versions and loaded by alias as predict and external validation load them: each reads as it did, with its
    kind, thresholds, calibration and the policy it was trained with (uncertain ``ones``)."""
    import torch

    client, uri = get_client()
    expected = {}
    for kind, outputs in (("per_pathology", 1), ("multilabel", len(SLUGS))):
        folder = tmp_path / kind
        shutil.copytree(FIXTURE / kind, folder)
        torch.manual_seed(outputs)
        net = build_model("resnet18", 0.2, outputs=outputs)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "artifacts" / "checkpoint" / "model.safetensors"))
        expected[kind] = load_checkpoint(folder / "artifacts" / "checkpoint")
        with tracked_run(f"test[{kind}]") as run:
            run.log_artifact(folder, MODEL_ARTIFACT)
            register(run, f"cxr-old-{kind}".replace("_", "-"), score=0.7, description="registered at af43cf9", tags={})
    loaded = {r.name: r for r in load_registered(client, uri, ["cxr-old-per-pathology", "cxr-old-multilabel", "cxr-never-registered"])}
    assert sorted(loaded) == ["cxr-old-multilabel", "cxr-old-per-pathology"]
    one, multi = loaded["cxr-old-per-pathology"].model, loaded["cxr-old-multilabel"].model
    assert (one.config.kind, one.slugs, one.thresholds, one.calibrated) == ("per_pathology", ["edema"], [0.42], True)
    assert (multi.config.kind, multi.slugs, multi.calibrated) == ("multilabel", list(SLUGS), True)
    assert multi.thresholds == pytest.approx([0.3 + 0.01 * j for j in range(len(SLUGS))])
    assert one.config.policy == multi.config.policy == {"uncertain": "ones", "blank": "zeros"}
    assert one.prior is None and multi.prior is None  # written before the windows travelled: the percentile window
    imgs = _images()
    for name, kind in (("cxr-old-per-pathology", "per_pathology"), ("cxr-old-multilabel", "multilabel")):
        scores = expected[kind].probabilities(imgs)
        np.testing.assert_allclose(loaded[name].model.probabilities(imgs), scores, atol=1e-6)
        served = loaded[name].pyfunc.predict(imgs)  # the pyfunc: calibrated probabilities and calls, as then
        first = expected[kind].slugs[0]
        np.testing.assert_allclose(served[first].to_numpy(), expected[kind].calibrate(scores)[:, 0], atol=1e-6)
        assert loaded[name].label == f"{name} v1"


def test_a_file_without_a_window_is_read_through_the_windows_the_model_was_trained_on(tmp_path):
    """The checkpoint carries its training images' windows (``CheckpointConfig.window_prior``), and the served model
    reads a DICOM without a window through them, as external validation and the drift monitor read such files, not
    through the percentile window: a PACS that drops the window is scored as its images were trained."""
    import mlflow.pyfunc

    from cxr_pipeline.data.voi import WindowPrior
    from cxr_pipeline.vision.checkpoint import CheckpointConfig, config_from_json, read_config, write_checkpoint
    from cxr_pipeline.vision.serving import save_pyfunc

    windowless = tmp_path / "windowless.dcm"
    windowless.write_bytes(without_window(REAL[0]))
    prior = WindowPrior(((0.35, 0.4, "LINEAR"), (0.6, 0.9, "LINEAR_EXACT"), (0.5, 0.3, "SIGMOID")))  # the file's draw
    files = ClassifierFiles(tmp_path / "ck")
    config = CheckpointConfig("resnet18", SIZE, ("Edema",), {"edema": 0.5}, {"edema": None}, 0.2, window_prior=prior.windows)
    write_checkpoint(build_model("resnet18", 0.2, outputs=1), files, config)
    assert read_config(files.checkpoint).window_prior == prior.windows and load_checkpoint(files.checkpoint).prior == prior
    damaged = {**config.as_json(), "window_prior": [[0.35, float("nan"), "LINEAR"]]}
    with pytest.raises(ValueError, match=r"ck/config.json: field 'window_prior' holds 1 unusable window"):
        config_from_json(damaged, "ck/config.json")  # never a silent misreading of every windowless file

    model = mlflow.pyfunc.load_model(str(save_pyfunc(files.checkpoint, tmp_path / "model")))
    through, plain = prepare(str(windowless), SIZE, prior=prior), prepare(str(windowless), SIZE)
    assert np.abs(through.astype(int) - plain).mean() > 5  # the prior's window is not the percentile window
    by_path = model.predict(np.zeros((0, SIZE, SIZE), np.uint8), params={"paths": [str(windowless)]})
    np.testing.assert_allclose(by_path["edema"].to_numpy(), model.predict(through[None])["edema"].to_numpy(), atol=1e-6)


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)


def test_registered_version_loads_with_mlflow_and_predicts_images_and_files(registry, tmp_path):
    import mlflow.pyfunc
    from PIL import Image

    model = mlflow.pyfunc.load_model("models:/cxr-cardiomegaly@champion")
    # the signature says what a request must be: grey uint8 at the model's size
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, SIZE, SIZE)
    imgs = _images()
    out = model.predict(imgs)
    expect = load_checkpoint(registry["cardiomegaly"]).probabilities(imgs)[:, 0]
    np.testing.assert_allclose(out["cardiomegaly"].to_numpy(), expect, atol=1e-6)
    assert out["cardiomegaly_call"].all()  # threshold 0
    meta = model.metadata.metadata  # thresholds named by their scale; the calls are read on the network's scores
    assert "thresholds" not in meta and meta["thresholds_uncalibrated"] == {"cardiomegaly": 0.0} and "calls" in meta
    # file paths through the shard decoder: a real CR (DICOM, MONOCHROME1) and a PNG
    png = tmp_path / "x.png"
    Image.fromarray(np.linspace(0, 255, 64 * 48, dtype=np.uint8).reshape(64, 48)).save(png)
    by_path = model.predict(np.zeros((0, SIZE, SIZE), np.uint8), params={"paths": [str(REAL[0]), str(png)]})
    decoded = np.stack([prepare(str(REAL[0]), SIZE), prepare(str(png), SIZE)])
    np.testing.assert_allclose(by_path["cardiomegaly"].to_numpy(), model.predict(decoded)["cardiomegaly"].to_numpy(), atol=1e-6)
    # the multi-label model answers for all 14 findings
    multi = mlflow.pyfunc.load_model("models:/cxr-multilabel@champion").predict(imgs)
    assert list(multi.columns) == [c for s in SLUGS for c in (s, f"{s}_call")]
    # the weights inside the MLflow model are the unchanged safetensors checkpoint (no pickle of ours)
    local = Path(mlflow.artifacts.download_artifacts("models:/cxr-edema@champion"))
    weights = ClassifierFiles(registry["edema"].parent).weights
    assert (local / "artifacts" / "checkpoint" / weights.name).read_bytes() == weights.read_bytes()
    assert not list(local.rglob("*.pkl"))
    with pytest.raises(Exception, match="uint8|shape|dtype"):
        model.predict(np.zeros((1, SIZE + 1, SIZE), np.uint8))


def test_mlflow_models_serve_answers_like_the_loaded_model(registry, tmp_path):
    """``mlflow models serve --env-manager local`` on the registered champion; POST an image."""
    import mlflow.pyfunc

    port = services.free_port()
    log = tmp_path / "serve.log"
    # the scoring server is uvicorn from the same environment (found on PATH, as in an activated venv)
    env = {**os.environ, "PATH": f"{services.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(services.BIN / "mlflow"), "models", "serve", "-m", "models:/cxr-cardiomegaly@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = services.start(cmd, env, log)
    try:
        services.wait_http(f"http://127.0.0.1:{port}/ping", 180, proc, log)
        imgs = _images(2)
        answer = services.post(f"http://127.0.0.1:{port}/invocations", {"inputs": imgs.tolist()}, timeout=60)
    finally:
        services.stop(proc)
    served = answer["predictions"]
    local = mlflow.pyfunc.load_model("models:/cxr-cardiomegaly@champion").predict(imgs)
    np.testing.assert_allclose([r["cardiomegaly"] for r in served], local["cardiomegaly"].to_numpy(), atol=1e-6)
    assert [r["cardiomegaly_call"] for r in served] == local["cardiomegaly_call"].tolist()


def test_predict_command_on_real_radiographs_prints_14_rows_and_writes_overlays(registry, tmp_path, capsys):
    cams = tmp_path / "cams"
    assert main(["predict", *map(str, REAL), "--cam", str(cams)]) == 0
    out = capsys.readouterr().out
    for path in REAL:
        block = out.split(str(path))[1].split("saliency:")[0] if str(path) in out else ""
        rows = [ln for ln in block.splitlines()[2:] if ln.startswith("  ") and not ln.startswith("  finding")]
        assert len(rows) >= 14, out
    assert "cxr-cardiomegaly v1" in out and "POSITIVE" in out
    from cxr_pipeline.settings import paths

    assert list((paths().home / "logs").glob("predict-*.log"))  # the libraries' messages went to a log, not the terminal
    assert out.count("no champion model") == 2 * 12  # 12 findings have no registered per-pathology model
    # cardiomegaly is positive (threshold 0): one overlay per image, RGB
    from PIL import Image

    files = sorted(cams.glob("*.png"))
    assert [f.name for f in files] == ["RG1_UNCR_cardiomegaly.png", "RG3_UNCR_cardiomegaly.png"]
    import pydicom

    # drawn on the source radiograph (the letterbox undone): its aspect, its long side 512 px
    ds = pydicom.dcmread(REAL[0], stop_before_pixels=True)
    width, height = Image.open(files[0]).size
    assert Image.open(files[0]).mode == "RGB" and max(width, height) == 512
    assert abs(width / height - ds.Columns / ds.Rows) < 0.01
    # the multi-label model fills every row
    assert main(["predict", str(REAL[0]), "--model", "multilabel"]) == 0
    assert "no champion model" not in capsys.readouterr().out


def test_predict_command_errors_name_the_problem(registry, tmp_path, capsys):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 200)
    assert main(["predict", str(bad)]) == 2
    assert "broken.dcm" in capsys.readouterr().err
    assert main(["predict", str(REAL[0]), "--alias", "nonexistent"]) == 2
    assert "no model registered under alias 'nonexistent'" in capsys.readouterr().err


def test_saliency_cases_are_the_most_confident_of_each_kind():
    y = np.array([1, 1, 1, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.2, 0.8, 0.1, 0.55, 0.4])
    assert pick_cases(y, p, 0.5, per_kind=2) == [(0, "TP"), (1, "TP"), (3, "FP"), (5, "FP"), (2, "FN"), (6, "FN")]


def test_the_scorer_reads_a_windowless_file_through_each_models_own_windows(registry, tmp_path):
    """The PACS intake's and ``predict``'s scorer decodes a file once per reading: a model whose checkpoint carries
    training windows reads a windowless file through them, one without (cardiomegaly, registered before) through the
    percentile window, though both take 32 px."""
    from cxr_pipeline.data.voi import WindowPrior
    from cxr_pipeline.vision.checkpoint import CheckpointConfig, write_checkpoint
    from cxr_pipeline.vision.predict import Scorer
    from cxr_pipeline_tests.registered import register_folder

    prior = WindowPrior(((0.35, 0.4, "LINEAR"), (0.6, 0.9, "LINEAR_EXACT"), (0.5, 0.3, "SIGMOID")))
    files = ClassifierFiles(tmp_path / "ck_pneumonia")
    config = CheckpointConfig("resnet18", SIZE, ("Pneumonia",), {"pneumonia": 0.5}, {"pneumonia": None}, 0.2, window_prior=prior.windows)
    write_checkpoint(build_model("resnet18", 0.2, outputs=1), files, config)
    register_folder(files.checkpoint, "cxr-pneumonia")
    windowless = tmp_path / "windowless.dcm"
    windowless.write_bytes(without_window(REAL[0]))
    (result,) = Scorer().score([windowless])
    got = {f.slug: f.probability for f in result.findings if f.probability is not None}
    for s, folder, reading in (("pneumonia", files.checkpoint, prior), ("cardiomegaly", registry["cardiomegaly"], None)):
        m = load_checkpoint(folder)
        expected = m.calibrate(m.probabilities(prepare(str(windowless), SIZE, prior=reading)[None]))[0, 0]
        assert got[s] == pytest.approx(float(expected), abs=1e-6)
