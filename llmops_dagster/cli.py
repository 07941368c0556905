"""`llmops`: run the lifecycle, manage the embedded database, inspect quarantine.

    llmops run                   materialize the main job into the PostgreSQL-backed instance
    llmops env                   print the environment `dagster dev` needs (for `eval`)
    llmops db start|stop|url     the embedded server (start is implied by every other command)
    llmops quarantine [-n N]     the newest quarantined rows with their reasons
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import sqlalchemy as sa


def _database():
    from resources.database import PostgresResource

    return PostgresResource()


def _prepare_instance_env() -> dict[str, str]:
    from llmops_dagster.instance import prepare_dagster_home

    env = prepare_dagster_home(_database().admin_url())
    os.environ.update(env)
    return env


def cmd_env(_: argparse.Namespace) -> int:
    for name, value in _prepare_instance_env().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from llmops_dagster import database
    from llmops_dagster.settings import llmops_home

    resource = _database()
    if args.action == "stop":
        stopped = database.stop_embedded_server(
            resource.embedded_data_dir or llmops_home() / "pg"
        )
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
        return 0
    url = resource.url()
    resource.engine()  # migrated
    print(url if args.action == "url" else f"PostgreSQL ready at {url}")
    return 0


def _print_summary(result) -> None:
    print("\n== llmops run: summary ==")
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        shown = {
            k: v for k, v in metadata.items()
            if isinstance(v, int | float | str) and not str(v).startswith(("![", "|", "```"))
            and len(str(v)) < 120
        }
        print(f"\n{materialization.asset_key.to_user_string()}")
        for name, value in shown.items():
            print(f"  {name:26} {value}")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "PASSED" if evaluation.passed else "FAILED"
        description = evaluation.description or ""
        print(f"\ncheck {evaluation.asset_check_key.name}: {verdict}  {description}")


def cmd_run(args: argparse.Namespace) -> int:
    import dagster as dg

    _prepare_instance_env()
    from llmops_dagster.definitions import defs

    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def(args.job)
    run_config = json.loads(args.config) if args.config else {}
    result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=run_config)
    _print_summary(result)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"\nstep {event.step_key} failed: {event.event_specific_data.error.message}")
        print(f"\nrun {result.run_id} FAILED; it is in the Dagster UI (make ui)", file=sys.stderr)
        return 1
    print(f"\nrun {result.run_id} succeeded; see it in the Dagster UI (make ui)")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    engine = _database().engine()
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT source, row_number, reasons FROM quarantine_rows "
                    "ORDER BY quarantined_at DESC, row_number LIMIT :n"), {"n": args.n}
        ).all()
    for source, row_number, reasons in rows:
        print(f"{source} row {row_number}: {'; '.join(reasons)}")
    if not rows:
        print("quarantine is empty")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="materialize a job into the persistent instance")
    run.add_argument("--job", default="main")
    run.add_argument("--config", default="", help="run config as JSON")
    run.set_defaults(handler=cmd_run)
    commands.add_parser("env", help="environment for dagster dev").set_defaults(handler=cmd_env)
    db = commands.add_parser("db", help="the platform database")
    db.add_argument("action", choices=["start", "stop", "url"])
    db.set_defaults(handler=cmd_db)
    quarantine = commands.add_parser("quarantine", help="newest quarantined rows")
    quarantine.add_argument("-n", type=int, default=20)
    quarantine.set_defaults(handler=cmd_quarantine)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
