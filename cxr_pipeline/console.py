"""A console that shows progress, not logs: what the demo and the CLI print while the pipeline works.

Everything the libraries write while a command runs (Dagster's per-event log lines, its beta and
preview notices, MLflow's "Validating input example", transformers' loading bars, a bitsandbytes
kernel notice, deprecation warnings) goes to a log file under ``$CXR_HOME/logs/``: standard error is
redirected there at the file-descriptor level, so output from C extensions and subprocesses lands
there too, and Python warnings are routed through logging into it. The terminal keeps one line per
stage (with a tqdm bar for the long ones), our own warnings, and the summary; the log's path is
printed first so nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO


class Console:
    """Progress lines and bars on the terminal's standard error as it was before ``quiet`` redirected it."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.times: list[tuple[str, float]] = []  # (stage, seconds) in the order they ran: the run's time table

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator:
        """One stage: a bar over ``total`` steps (``advance()``), or a line when it is done; its time at the end."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=f"{name:<18}", file=self.stream, leave=True, ncols=88, unit="step", disable=False) if total else None
        done = {"ok": True}

        def advance(n: int = 1) -> None:
            if bar is not None:
                bar.update(n)

        try:
            yield advance
        except BaseException:
            done["ok"] = False
            raise
        finally:
            secs = time.perf_counter() - t0
            self.times.append((name, secs))
            if bar is not None:
                bar.set_postfix_str(f"{secs:.0f} s" if done["ok"] else "failed")
                bar.close()
            else:
                self.say(f"{name:<18} {'done' if done['ok'] else 'failed'} in {secs:.0f} s")


@contextlib.contextmanager
def quiet(log_dir: Path, name: str) -> Iterator[tuple[Console, Path]]:
    """Send standard error, Python warnings and library logging to ``log_dir/<name>-<time>.log`` for the block;
    yield a ``Console`` on the real standard error and the log's path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    log = open(path, "a", buffering=1)  # noqa: SIM115 (closed below, after the descriptor is restored)
    os.dup2(log.fileno(), 2)
    python_stderr, sys.stderr = sys.stderr, log  # also the Python object (a test harness may have swapped it)
    root = logging.getLogger()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    logging.captureWarnings(True)
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Console(terminal), path
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        logging.captureWarnings(False)
        root.removeHandler(handler)
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
        terminal.flush()


def time_table(times: list[tuple[str, float]], total: float) -> str:
    """Each stage's seconds and share of ``total``, and what the stages leave out (the summary, start-up)."""
    rows = [*times, ("other (start-up, summary)", max(0.0, total - sum(t for _, t in times)))]
    lines = [f"{'stage':<26} {'seconds':>8} {'share':>6}"]
    lines += [f"{name:<26} {secs:>8.0f} {secs / total:>6.0%}" for name, secs in rows]
    return "\n".join([*lines, f"{'total':<26} {total:>8.0f}"])
