"""Launching the DeepSpeed fine-tune as a process tree through Dagster Pipes."""

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
from pydantic import Field

from llmops_dagster.training.launch import launch_command


class TrainerResource(dg.ConfigurableResource):
    """Starts the standalone training script under torchrun or the deepspeed launcher, in a
    session of its own (so the whole tree can be stopped), and streams its Pipes messages."""

    launcher: str = Field(default="torchrun", description="'torchrun' (one node) or 'deepspeed'.")
    hostfile: str = Field(default="", description="DeepSpeed hostfile for several nodes.")
    threads_per_rank: int = Field(
        default=1, description="OMP_NUM_THREADS of each CPU rank (ranks x threads <= cores)."
    )

    def run(self, context: dg.AssetExecutionContext, run_file: Path, num_processes: int,
            extra_env: dict[str, str] | None = None) -> tuple[list, list]:
        """Train; return (the results and the custom messages reported through Pipes)."""
        command = launch_command(run_file, num_processes, self.launcher, self.hostfile)
        context.log.info(f"launching: {' '.join(command)}")
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
        ) as session:
            env = {**os.environ, **session.get_bootstrap_env_vars(),
                   "OMP_NUM_THREADS": str(self.threads_per_rank), **(extra_env or {})}
            tail = self._run_tree(command, env, cwd=run_file.parent)
            if tail is not None:
                code, lines = tail
                cause = next((line.strip() for line in lines if _is_cause(line)), "see last_output")
                raise dg.Failure(
                    description=f"training exited with code {code} "
                    f"({'killed by signal ' + str(-code) if code < 0 else cause}); "
                    f"re-run to resume from the last complete checkpoint",
                    metadata={"last_output": dg.MetadataValue.text("".join(lines))},
                )
        return list(session.get_results()), list(session.get_custom_messages())

    @staticmethod
    def _run_tree(command: list[str], env: dict, cwd: Path) -> tuple[int, list[str]] | None:
        """Run the launcher in a new session; forward its output; None when it succeeded, else
        (exit code, last lines). Stops the whole tree if this process is interrupted."""
        process = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = collections.deque(maxlen=200)
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                last.append(line)
            code = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        if code != 0:
            # A rank may have killed only part of the tree; leave nothing running.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return code, list(last)
        return None


def _is_cause(line: str) -> bool:
    """A line of the ranks' output that says why training stopped."""
    text = line.strip().split("]: ", 1)[-1] if line.startswith("[rank") else line.strip()
    return text.startswith("training diverged") or (
        "Error" in text and "ChildFailedError" not in text and "gloo" not in text
    )
