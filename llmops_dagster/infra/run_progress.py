"""A job run in this process, shown as one line per step event on the terminal, with the rest in a log file.

`llmops run` executes its job in its own process. Dagster's DEBUG event stream, library warnings,
Hugging Face progress bars and the fine-tune's torchrun output therefore all reach this process's
stdout and stderr. `execute_with_progress` points file descriptors 1 and 2 at a log file for the
length of the run (subprocesses inherit them). A thread follows the run's event log and writes to
the terminal, on a copy of the original stdout:

    [   7.3 s] validated_dataset started
    [   8.6 s] validated_dataset: 2400 rows validated: 2400 accepted, 0 quarantined
    [   8.7 s] validated_dataset done in 1.4 s

A step's progress is what it logs with a message beginning "progress:" (`context.log.info`; the
fine-tune's rank 0 logs its "progress: step N/M ..." lines through Dagster Pipes). A message
that counts "N/M" is shown each time N reaches a further tenth of M, so a step prints about ten
such lines, however often it logs them. Warnings and errors a step logs are shown as they come.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import dagster as dg

PROGRESS_PREFIX = "progress:"
FRACTION = re.compile(r"\b(\d+)/(\d+)\b")
QUALIFIED_CLASS = re.compile(r"^[\w.]+\.(\w+): ")  # "dagster._core.definitions.events.Failure: "
TENTHS = 10  # a counted message is shown at each tenth of its total
POLL_SECONDS = 1.0  # how often the event log is read; event times are exact whatever it is
LONGEST_MESSAGE = 300  # characters of a warning or error shown on the terminal; the log has it all


def log_path(logs_dir: Path, run_id: str, at: datetime | None = None) -> Path:
    """The log file of a run: named by its start time (so they sort) and the run id's first 8 characters."""
    return logs_dir / f"run-{(at or datetime.now()):%Y%m%d-%H%M%S}-{run_id[:8]}.log"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= LONGEST_MESSAGE else line[:LONGEST_MESSAGE] + " ..."


def _root_cause(error) -> str:
    """The innermost cause (the user's exception, not Dagster's wrapper around it) as
    "Class: message", without the class's module."""
    while error.cause is not None:
        error = error.cause
    return _first_line(QUALIFIED_CLASS.sub(r"\1: ", error.message, count=1))


class ProgressPrinter:
    """Turns a run's event log entries into terminal lines: a step's start, its progress, its end
    with its duration, the warnings and errors it logs, and the end of the run."""

    def __init__(self, out: TextIO, started: float):
        self.out = out
        self.started = started  # Unix time the lines' "[  12.3 s]" counts from
        self._step_started: dict[str, float] = {}
        self._tenths_shown: dict[tuple[str | None, str], int] = {}

    def entry(self, entry: dg.EventLogEntry) -> None:
        text = self.line(entry)
        if text is not None:
            self.out.write(f"[{entry.timestamp - self.started:7.1f} s] {text}\n")
            self.out.flush()

    def line(self, entry: dg.EventLogEntry) -> str | None:
        """The terminal line for one entry, or None for the entries only the log file shows."""
        Kind = dg.DagsterEventType  # noqa: N806
        step, event = entry.step_key, entry.dagster_event
        if event is None:
            return self._message(step, entry.level, entry.user_message)
        kind = event.event_type
        if kind == Kind.STEP_START:
            self._step_started[step] = entry.timestamp
            return f"{step} started"
        if kind == Kind.STEP_SUCCESS:
            return f"{step} done in {self._took(step, entry.timestamp):.1f} s"
        if kind == Kind.STEP_FAILURE:
            return (f"{step} FAILED after {self._took(step, entry.timestamp):.1f} s: "
                    f"{_root_cause(event.event_specific_data.error)}")
        if kind == Kind.STEP_UP_FOR_RETRY:
            return f"{step} failed after {self._took(step, entry.timestamp):.1f} s; it will be retried"
        if kind == Kind.STEP_SKIPPED:
            return f"{step} skipped (an upstream step yielded no output)"
        if kind == Kind.ASSET_CHECK_EVALUATION and not event.event_specific_data.passed:
            check = event.event_specific_data
            return f"{step}: check {check.asset_check_key.name} FAILED ({check.severity.value})"
        if kind in (Kind.RUN_SUCCESS, Kind.RUN_FAILURE, Kind.RUN_CANCELED):
            return {Kind.RUN_SUCCESS: "run succeeded", Kind.RUN_FAILURE: "run FAILED",
                    Kind.RUN_CANCELED: "run canceled"}[kind]
        return None

    def _took(self, step: str, at: float) -> float:
        return at - self._step_started.get(step, at)

    def _message(self, step: str | None, level: int, message: str) -> str | None:
        where = step or "run"
        if level >= logging.WARNING:
            return f"{where}: {logging.getLevelName(level)}: {_first_line(message)}"
        if not message.startswith(PROGRESS_PREFIX):
            return None
        text = message[len(PROGRESS_PREFIX):].strip()
        return f"{where}: {text}" if self._due(step, text) else None

    def _due(self, step: str | None, text: str) -> bool:
        """True unless the message counts N/M and the last one shown of this counter (the same
        step, the same words before the count) was in the same tenth of M."""
        count = FRACTION.search(text)
        if count is None or int(count.group(2)) <= 0:
            return True
        done, total = int(count.group(1)), int(count.group(2))
        tenth = min(TENTHS, done * TENTHS // total)
        counter = (step, text[:count.start()])
        if tenth <= self._tenths_shown.get(counter, -1):
            return False
        self._tenths_shown[counter] = tenth
        return True


class RunFollower:
    """Reads a run's new event log records every POLL_SECONDS in a thread of its own and hands
    each entry to the printer; `stop` reads the last ones. A failed read is reported in the log
    file and retried: following the run never stops the run."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, printer: ProgressPrinter,
                 interval: float = POLL_SECONDS):
        self.instance, self.run_id, self.printer, self.interval = instance, run_id, printer, interval
        self._cursor: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"follow-run-{run_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _follow(self) -> None:
        while not self._stopping.wait(self.interval):
            self._read()
        self._read()

    def _read(self) -> None:
        try:
            while True:
                connection = self.instance.get_records_for_run(self.run_id, cursor=self._cursor, limit=1000)
                for record in connection.records:
                    self.printer.entry(record.event_log_entry)
                self._cursor = connection.cursor
                if not connection.has_more:
                    return
        except Exception as error:  # noqa: BLE001 - a progress display must not fail the run
            print(f"run_progress: reading the event log of run {self.run_id} failed: {error!r}",
                  file=sys.stderr)


@contextlib.contextmanager
def output_to_file(path: Path) -> Iterator[TextIO]:
    """File descriptors 1 and 2, and sys.stdout and sys.stderr, write to `path` (appended)
    inside the block; yields a line-buffered stream to where stdout went before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    terminal = open(os.dup(1), "w", buffering=1, encoding=encoding, errors="replace")  # noqa: SIM115
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    finally:
        os.close(log_fd)
    # Text streams on fds 1 and 2 themselves, not on copies: Dagster's capture of a step's output
    # redirects sys.stdout's descriptor, and code that replaced sys.stdout (pytest) is bypassed.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    try:
        yield terminal
    finally:
        # Whatever is still buffered in any of these streams belongs to the run: into the file.
        for stream in (sys.stdout, sys.stderr, *streams):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        terminal.close()


def execute_with_progress(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    log_file: Path,
    run_config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    terminal: TextIO | None = None,
) -> dg.ExecuteInProcessResult:
    """`job.execute_in_process` (errors in the result, not raised) with its output in `log_file`
    and one line per step event on `terminal` (default: the process's stdout)."""
    run_id = run_id or str(uuid.uuid4())
    with output_to_file(log_file) as original_stdout:
        out = terminal or original_stdout
        started = time.time()
        follower = RunFollower(instance, run_id, ProgressPrinter(out, started))
        follower.start()
        try:
            return job.execute_in_process(instance=instance, run_id=run_id, run_config=run_config or {},
                                          raise_on_error=False)
        finally:
            follower.stop()
