"""Every metrics row to a Weights & Biases run: ``run.wandb=PROJECT`` (the optional ``wandb`` package).

Rank 0 opens one W&B run per session, with its files under ``RUN_DIR/wandb`` so that an offline run
(``WANDB_MODE=offline``; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later) is self-contained. The
resolved config is the W&B run's config; each metrics row is logged at its ``step`` with TensorBoard's names
(``scalars``: ``phase_ms/forward``, ``gpu0/power_w``); when the run reaches its last step the report
(``fastbyol report``'s PNGs and page, written to ``RUN_DIR/report``) is logged at that step too.

Resume. The W&B run id is drawn when the run starts and kept in ``RUN_DIR/wandb_id.txt`` (written atomically); a
resumed session opens the same id (``resume="allow"``), so W&B shows one run. A run killed after its last
checkpoint had logged rows past it; the resumed session computes those steps again (metrics.jsonl drops the old
rows, TensorBoard purges them) but W&B keeps a step's first value and refuses a step at or below its last one, so
this sink does not send them again: the steps already logged, by metrics.jsonl as it stood before the resume, are
skipped. A resume is bitwise, so the skipped rows carry the same loss, lr and tau as W&B's; only their timing fields
(img/s, phase times) differ. W&B's rewind (``resume_from=ID?_step=S``) would replace them, but it is a server-side
beta feature that an offline run cannot show, so it is not used. A run that turns ``run.wandb`` on at a resume
gets a new W&B run, sent the rows metrics.jsonl already holds first; rows of a session that ran without
``run.wandb`` in between are not sent later.

Failures. A missing package or a W&B run that cannot start (no ``wandb login`` in online mode, no network) stops
the run before its first step with one line. A logging error mid-run prints one line and turns W&B off for the
rest of the session; metrics.jsonl keeps every row.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastbyol.errors import FastByolError
from fastbyol.files import atomic_write_bytes
from fastbyol.telemetry.sinks import scalars

WANDB_ID_FILE = "wandb_id.txt"


def require_wandb(project: str) -> None:
    """Fail before the run starts, not at its first row, when the optional package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise FastByolError(f"run.wandb={project} needs the wandb package: pip install wandb (or "
                            "fastbyol[track]), or drop run.wandb") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of metrics.jsonl (a killed run may leave its last line half-written)."""
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class WandbSink:
    """One W&B run per session on rank 0 (see the module's docstring for resume and failures)."""

    def __init__(self, run_dir: Path, project: str, entity: str = "", name: str = "", tags: Sequence[str] = (),
                 config: dict[str, Any] | None = None, resumed_at: int = 0) -> None:
        require_wandb(project)
        import wandb

        self._wandb = wandb
        id_path = run_dir / WANDB_ID_FILE
        saved = id_path.read_text(encoding="utf-8").strip() if resumed_at and id_path.is_file() else ""
        rows = _complete_rows(run_dir / "metrics.jsonl")  # read before the trainer truncates it to resumed_at
        if saved:  # the same W&B run: it has every row logged so far, also those past the checkpoint
            self.logged_through = max((int(r.get("step", 0)) for r in rows), default=0)
            backfill: list[dict[str, Any]] = []
        else:  # a new W&B run (also for a run restarted from nothing): the rows the resume keeps, if any
            self.logged_through = 0
            backfill = [r for r in rows if int(r.get("step", 0)) <= resumed_at]
        run_id = saved or secrets.token_hex(8)  # W&B ids: no / \ # ? % : (hex has none)
        try:
            self.run: Any = wandb.init(project=project, entity=entity or None, name=name or run_dir.name,
                                       tags=list(tags) or None, config=config, id=run_id, resume="allow",
                                       dir=str(run_dir), allow_val_change=True)
        except Exception as e:  # wandb raises UsageError, CommError, pydantic's ValidationError, ...
            raise FastByolError(f"run.wandb={project}: W&B could not start the run ({_first_line(e)}): run "
                                "`wandb login`, or set WANDB_MODE=offline (then `wandb sync`), or drop run.wandb"
                                ) from None
        if not saved:
            atomic_write_bytes(id_path, f"{run_id}\n".encode())
        # Online, W&B knows the run's last step and drops lower ones itself; skip them here without its warning.
        self.logged_through = max(self.logged_through, int(getattr(self.run, "starting_step", 0) or 0) - 1)
        for row in backfill:
            self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if self.run is None or step <= self.logged_through:
            return
        self._log(scalars(row), step)

    def _log(self, data: dict[str, Any], step: int) -> None:
        try:
            self.run.log(data, step=step)
        except Exception as e:  # a dead wandb service, a full disk: never worth stopping a long run for
            print(f"fastbyol: W&B logging off from step {step}: {_first_line(e)} (metrics.jsonl keeps every row)",
                  file=sys.stderr)
            self._finish(exit_code=1)

    def log_report(self, run_dir: Path, step: int) -> None:
        """The run's report (``fastbyol report RUN_DIR``) at its last step: each plot as an image, the page as
        HTML. A report that cannot be drawn is said in one line; the run has finished either way."""
        if self.run is None:
            return
        from fastbyol.telemetry.report import build_report

        try:
            page = build_report(run_dir)
            data: dict[str, Any] = {f"report/{png.stem}": self._wandb.Image(str(png))
                                    for png in sorted(page.parent.glob("*.png"))}
            data["report/page"] = self._wandb.Html(page.read_text(encoding="utf-8"), inject=False)
        except Exception as e:  # matplotlib or a file: the report is a bonus at the end of a finished run
            print(f"fastbyol: no report sent to W&B: {_first_line(e)}", file=sys.stderr)
            return
        self._log(data, step)

    def close(self, failed: bool = False, preempted: bool = False) -> None:
        """Finish the W&B run: failed (exit code 1), or preempted (W&B marks it so), or done."""
        if self.run is None:
            return
        if preempted:
            try:
                self.run.mark_preempting()
            except Exception:  # only a state shown on the web page
                pass
        self._finish(exit_code=1 if failed or preempted else 0)

    def _finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            print(f"fastbyol: W&B run did not finish cleanly: {_first_line(e)}", file=sys.stderr)
