"""`llmops run`'s terminal lines and log file: a tiny two-step job executed through
run_progress.execute_with_progress (the path cmd_run takes) on a real Dagster instance.

Touches: a temporary Dagster instance (SQLite), this process's file descriptors 1 and 2 (restored),
a log file under tmp_path."""

import io
import logging
import os
import subprocess
import sys
import time

import dagster as dg

from llmops_dagster.infra import run_progress


@dg.asset
def rows(context: dg.AssetExecutionContext) -> int:
    print("printed by the rows step")
    subprocess.run([sys.executable, "-c", "print('printed by a subprocess of the rows step')"], check=True)
    for done in range(0, 101, 5):  # 21 counted messages: one shown a tenth
        context.log.info(f"progress: {done}/100 rows validated")
    context.log.info("an ordinary message, for the log file only")
    return 100


@dg.asset(deps=[rows])
def model(context: dg.AssetExecutionContext) -> int:
    context.log.info("progress: fine-tune abc: 800 steps on 2 ranks")
    for step in range(10, 801, 10):  # as the fine-tune's rank 0 logs them through Pipes
        context.log.info(f"progress: step {step}/800 loss 1.0000 lr 1.00e-04 100 tokens/s")
    context.log.warning("the feedback budget was passed")
    return 1


@dg.asset
def broken() -> int:
    raise dg.Failure(description="training exited with code 1 (training diverged)")


@dg.asset(deps=[broken])
def downstream() -> int:
    return 1


def run(tmp_path, job_name: str, selection: list) -> tuple[dg.ExecuteInProcessResult, list[str], str]:
    defs = dg.Definitions(assets=[rows, model, broken, downstream],
                          jobs=[dg.define_asset_job(job_name, selection)])
    terminal = io.StringIO()
    log_file = tmp_path / "logs" / "run.log"
    with dg.instance_for_test() as instance:
        result = run_progress.execute_with_progress(defs.resolve_job_def(job_name), instance, log_file,
                                                    terminal=terminal)
    return result, terminal.getvalue().splitlines(), log_file.read_text()


def shown(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


def test_each_step_shows_one_start_one_end_and_its_progress_the_rest_goes_to_the_log(tmp_path):
    stdout_before, stdout_inode = sys.stdout, os.fstat(1).st_ino
    result, lines, log = run(tmp_path, "two_steps", [rows, model])

    assert result.success
    assert all(line.startswith("[") and " s] " in line for line in lines), lines
    for step in ("rows", "model"):
        assert len(shown(lines, f"] {step} started")) == 1, lines
        assert len(shown(lines, f"] {step} done in ")) == 1, lines
    assert [line.split("] ", 1)[1] for line in shown(lines, "rows validated")] == [
        f"rows: {done}/100 rows validated" for done in range(0, 101, 10)]
    steps = [line.split("model: step ")[1].split()[0] for line in shown(lines, "model: step ")]
    assert steps == [f"{step}/800" for step in (10, *range(80, 801, 80))]
    assert shown(lines, "model: fine-tune abc: 800 steps on 2 ranks")
    assert shown(lines, "model: WARNING: the feedback budget was passed")
    assert lines[-1].endswith("] run succeeded")
    assert len(lines) == 2 * 2 + 11 + 11 + 1 + 1 + 1

    # Everything else is in the log file: Dagster's DEBUG events, every message, what the step
    # and its subprocess printed.
    assert "DEBUG" in log and "STEP_START" in log and "RUN_SUCCESS" in log
    assert "progress: 5/100 rows validated" in log and "step 330/800 loss" in log
    assert "an ordinary message, for the log file only" in log
    assert "ordinary message" not in "\n".join(lines)
    assert "printed by the rows step" in log
    deadline = time.monotonic() + 5  # Dagster copies a step's output to fd 1 with `tail -F`
    while "printed by a subprocess" not in log and time.monotonic() < deadline:
        time.sleep(0.2)
        log = (tmp_path / "logs" / "run.log").read_text()
    assert "printed by a subprocess of the rows step" in log
    # The process writes to the terminal again.
    assert sys.stdout is stdout_before and os.fstat(1).st_ino == stdout_inode


def test_a_failed_step_shows_its_error_and_what_did_not_run(tmp_path):
    result, lines, log = run(tmp_path, "failing", [broken, downstream])

    assert not result.success
    failed = shown(lines, "] broken FAILED after ")
    assert len(failed) == 1
    assert failed[0].endswith(": Failure: training exited with code 1 (training diverged)")
    assert shown(lines, "downstream: ERROR: Dependencies for step downstream failed: ['broken']")
    assert not shown(lines, "downstream started")
    assert lines[-1].endswith("] run FAILED")
    assert "STEP_FAILURE" in log and "training diverged" in log


def test_a_counter_is_shown_at_each_tenth_independently_of_other_counters():
    terminal = io.StringIO()
    printer = run_progress.ProgressPrinter(terminal, started=0.0)

    def message(text: str, step: str = "eval_report", level: int = logging.INFO) -> None:
        printer.entry(dg.EventLogEntry(error_info=None, level=level, user_message=text, run_id="r",
                                       timestamp=1.5, step_key=step))

    for done in range(1, 41):
        message(f"progress: candidate: {done}/40 examples scored")
        message(f"progress: base: {done}/40 examples scored")
    message("progress: no count here")
    message("a message without the prefix")
    message("something failed", level=logging.ERROR)
    lines = terminal.getvalue().splitlines()

    # 1/40 (the first), then 4/40, 8/40 ... 40/40: eleven lines of each counter.
    assert len(shown(lines, "candidate:")) == 11 and len(shown(lines, "base:")) == 11
    assert shown(lines, "candidate: 4/40")[0] == "[    1.5 s] eval_report: candidate: 4/40 examples scored"
    assert shown(lines, "eval_report: no count here")
    assert not shown(lines, "without the prefix")
    assert shown(lines, "eval_report: ERROR: something failed")
