"""The PACS in the graph: a sensor that follows Orthanc's changes feed and scores each study as it becomes stable.

Why the sensor scores (rather than requesting a run per study): a run is a new process that imports torch and
loads fourteen registered models from MLflow before it scores anything; the sensor runs in the code location's
process, so the champions stay loaded (warm) between ticks for as long as that process lives, and a study costs
its scoring. A persistent code server (``dagster code-server start``, as the Compose stack and the round-trip
benchmark run it) lives until stopped; a daemon that starts its own code servers (``dagster dev``,
``dagster-daemon run -m``) replaces them about once a minute, and each replacement loads the models again on its
first tick. The models are reloaded when the registry's champion versions change, so a
promotion scores the next studies with the new champion (``cxr-pipeline pacs-rescore`` re-scores older ones).
Each tick works for at most ``TICK_BUDGET`` seconds (a sensor evaluation times out at 60 s) and moves the cursor
(Orthanc's change sequence number) only past studies it finished; what is left is taken up on the next tick.

Exactly once per study and set of champion versions: ``vision.pacs_intake.score_study`` looks for the SR series
those versions would write before scoring, and the objects' UIDs are derived from that key, so a replayed change
or a daemon killed mid-tick sends nothing twice. Orthanc down: the tick is skipped with the reason and the cursor
stays, so nothing is lost. The outcomes are reported as materializations of ``pacs_results`` (counts only: no
header text) and appended to ``$CXR_HOME/pacs/intake.csv``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import dagster as dg

from cxr_pipeline.config import resolve
from cxr_pipeline.data.window_prior import kept_window_prior
from cxr_pipeline.defs.keys import IMAGE_DRIFT, IMAGE_SHARDS
from cxr_pipeline.settings import env, paths
from cxr_pipeline.vision.checkpoint import CHAMPION
from cxr_pipeline.vision.pacs_intake import (
    Keep,
    Orthanc,
    Outcome,
    PacsUnavailable,
    ledger_path,
    record,
    score_study,
    stable_studies,
    summary,
)
from cxr_pipeline.vision.pacs_windows import QuietStore, WindowStore, pacs_windows_root
from cxr_pipeline.vision.predict import PredictError, Scorer

PACS_RESULTS = "pacs_results"
TICK_BUDGET = 30.0  # seconds of scoring per sensor tick (Dagster's sensor evaluation times out at 60 s)

pacs_results = dg.AssetSpec(
    PACS_RESULTS,
    group_name="pacs",
    kinds={"dicom"},
    description="DICOM results (TID 1500 SR, GSPS, Secondary Capture) the pacs_intake sensor stored into the PACS's "
    "stable studies; each materialization counts one tick's studies (stored, already stored, no frontal chest image, "
    "unreadable images). The objects live in the PACS; the ledger of outcomes in $CXR_HOME/pacs/intake.csv.",
)

_warm: dict[str, Scorer] = {}
_lock = threading.Lock()  # one tick at a time per process scores (the daemon may overlap a slow tick)


def warm_scorer(alias: str = CHAMPION) -> Scorer:
    """The champions, loaded once per process and again only when the registry's versions change."""
    scorer = _warm.get(alias)
    if scorer is None or not scorer.current():
        scorer = _warm[alias] = Scorer(alias)
    return scorer


MAX_ATTEMPTS = 3  # a study that failed is tried again on the next ticks, this many times in all


@dataclass
class Intake:
    """One tick's work: the cursor to keep (the change sequence number, and the failed studies still to be retried
    with their attempts so far), each study's outcome, and why it stopped early (if it did)."""

    seq: int
    retry: dict[str, int] = field(default_factory=dict)  # Orthanc study id -> failed attempts
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: str = ""
    windows: list[str] = field(default_factory=list)  # drift windows closed by this tick (pacs-NNNN)
    drift_errors: list[str] = field(default_factory=list)  # the drift store's failures, by error type (never a study's)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> Intake:
        if not cursor:
            return cls(0)
        if cursor.isdigit():  # the cursor this sensor kept before it retried failures
            return cls(int(cursor))
        body = json.loads(cursor)
        return cls(int(body["seq"]), {k: int(v) for k, v in body.get("retry", {}).items()})

    def cursor(self) -> str:
        return json.dumps({"seq": self.seq, "retry": self.retry}, sort_keys=True)

    def score(self, pacs: Orthanc, scorer: Scorer, study: str, keep: Keep) -> None:
        """One study scored, its outcome in the ledger at once; a failure counted for a retry, up to MAX_ATTEMPTS."""
        outcome = score_study(pacs, scorer, study, keep)
        self.outcomes.append(outcome)
        record(ledger_path(), outcome)
        if outcome.status == "failed" and self.retry.get(study, 0) + 1 < MAX_ATTEMPTS:
            self.retry[study] = self.retry.get(study, 0) + 1
        else:
            self.retry.pop(study, None)


def drift_store() -> WindowStore:
    """Where the intake keeps each scored study's image for the drift monitor: at every size the shards are built
    at, in windows of ``image_drift.pacs_window`` studies (``vision.pacs_windows``); a file without a window read
    through the training images' windows at the largest, as the drift asset's external windows are, as last fitted
    (``data.window_prior.kept_window_prior``: a tick neither fits one nor needs the raw root; none fitted yet, the
    percentile window)."""
    p = paths()
    cfg, sizes = resolve(p, IMAGE_DRIFT, {}), resolve(p, IMAGE_SHARDS, {}).sizes
    prior = kept_window_prior(p, max(sizes)) if sizes else None
    return WindowStore(pacs_windows_root(), sizes, cfg.pacs_window, cfg.pacs_windows_kept, prior)


def intake(url: str, state: Intake, budget: float = TICK_BUDGET, alias: str = CHAMPION) -> Intake:
    """Score the studies that failed before (up to ``MAX_ATTEMPTS``) and those that became stable after the cursor,
    until done or ``budget`` seconds after the tick began. Each outcome is in the ledger as soon as it is known; a
    PACS that stops answering ends the tick, the cursor past every change handled. A tick that finds another still
    running in this process (a slow one the daemon gave up waiting for) does nothing. Each scored study's image is
    kept for the drift monitor, and the windows it fills are closed as the tick ends (``drift_store``)."""
    deadline = time.monotonic() + budget
    out = Intake(state.seq, dict(state.retry))
    if not _lock.acquire(blocking=False):
        out.stopped = "the previous tick is still scoring; nothing done"
        return out
    pacs, store, scorer = Orthanc(url), QuietStore(drift_store), None
    try:
        for study in list(out.retry):
            scorer = scorer or warm_scorer(alias)
            out.score(pacs, scorer, study, store.keep)
        for seq, study in stable_studies(pacs, out.seq):
            if study is not None:
                out.retry.pop(study, None)  # stable again: scored now, from its first attempt
                scorer = scorer or warm_scorer(alias)
                out.score(pacs, scorer, study, store.keep)
            out.seq = seq
            if time.monotonic() > deadline:
                out.stopped = f"tick budget of {budget:.0f} s spent; going on from change {out.seq} next tick"
                break
    except PacsUnavailable as e:
        out.stopped = f"{e}; retrying from change {out.seq}"
    finally:
        try:
            out.windows = store.close()
            out.drift_errors = store.errors
        finally:
            _lock.release()
    return out


def pacs_intake_sensor() -> dg.SensorDefinition:
    """The sensor, built when the definitions are (its interval and default status read the environment then)."""

    @dg.sensor(
        name="pacs_intake",
        minimum_interval_seconds=int(env("CXR_PACS_INTERVAL")),
        default_status=dg.DefaultSensorStatus.RUNNING if env("CXR_PACS_URL") else dg.DefaultSensorStatus.STOPPED,
        description="Follows the PACS's changes feed (CXR_PACS_URL, an Orthanc with DICOMweb): each study that became stable "
        "and holds a frontal chest image is scored by the champions, and its SR, GSPS and SC are stored back into it, once "
        "per study and set of champion versions.",
    )
    def pacs_intake(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        url = env("CXR_PACS_URL") or "http://127.0.0.1:8042"
        state = Intake.from_cursor(context.cursor)
        try:
            done = intake(url, state)
        except PredictError:  # no champion registered yet: the studies wait (the cursor stays; the store's URI unsaid)
            return dg.SkipReason(f"no model registered under alias {CHAMPION!r}; studies wait from change {state.seq}")
        if done.stopped:
            context.log.info(done.stopped)
        if not done.outcomes:
            if done.cursor() == state.cursor() and done.stopped:
                return dg.SkipReason(done.stopped)
            return dg.SensorResult(cursor=done.cursor(), skip_reason=done.stopped or "no study became stable")
        metadata = {
            **summary(done.outcomes),
            "cursor": done.seq,
            "retrying": len(done.retry),
            "drift_windows_closed": len(done.windows),
            "drift_store_errors": ", ".join(sorted(set(done.drift_errors))) or "none",
            "ledger": dg.MetadataValue.path(str(ledger_path())),
        }
        return dg.SensorResult(cursor=done.cursor(), asset_events=[dg.AssetMaterialization(PACS_RESULTS, metadata=metadata)])

    return pacs_intake
