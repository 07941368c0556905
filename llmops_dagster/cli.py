"""`llmops`: run the lifecycle, manage the embedded database, inspect quarantine, govern models.

    llmops run                   materialize the main job into the PostgreSQL-backed instance
    llmops env                   print the environment `dagster dev` needs (for `eval`)
    llmops db start|stop|url     the embedded server (start is implied by every other command)
    llmops serve stop|status     the local Ray head that serving starts (not a cluster given by address)
    llmops ui [--port N] [--operate]   the Dagster UI (webserver and daemon): read-only to browse;
                                 --operate: launch runs, under a secret path only this OS user can read
    llmops status                the registry's production version, the served one, runs in flight
    llmops quarantine [-n N]     the newest quarantined rows with their reasons
    llmops trace RESPONSE_ID [--html FILE]   a served answer back to its model, prompt set, dataset
                                 and the training rows nearest to its question; --html also writes
                                 it as a page linked to the Dagster UI `llmops ui` serves
    llmops models list           registered model versions, newest first
    llmops models show VERSION   one version's fields and its audit log
    llmops models approve VERSION [--by NAME] [--reason TEXT]   promote it to production
    llmops models reject VERSION --reason TEXT [--by NAME]      withdraw a candidate
    llmops models rollback --reason TEXT [--by NAME]            restore the previous production version
    llmops keys create NAME --role client|rater|reviewer   a new API key, printed once
    llmops keys list | revoke NAME                         keys (never the keys themselves); revoke one
    llmops feedback review [--accept ID ...] [--reject ID ...] [--by NAME] [--note TEXT]
                                 corrections waiting for review: one by one, or decided by id
    llmops feedback purge [--id ID ...] [--key NAME] [--since T] [--until T] --reason TEXT
                                 delete feedback rows (each leaves an audit record, not its text)
    llmops feedback purge-answers --until T --reason TEXT
                                 delete logged answers (prompts, responses) and their ratings
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from datetime import UTC
from pathlib import Path

import sqlalchemy as sa

from llmops_dagster.governance import registry


def _database():
    from resources.database import PostgresResource

    return PostgresResource()


def _ray_serve():
    """Ray Serve as the code location configures it (ports from LLMOPS_SERVE_HTTP_PORT and
    LLMOPS_RAY_PORT), so that the CLI looks where the runs deploy."""
    from llmops_dagster.definitions import ray_serve_resource

    return ray_serve_resource()


def _prepare_instance_env() -> dict[str, str]:
    from llmops_dagster.infra.instance import prepare_dagster_home

    env = prepare_dagster_home(_database())
    os.environ.update(env)
    return env


def cmd_env(_: argparse.Namespace) -> int:
    from llmops_dagster.infra.database import redacted

    for name, value in _prepare_instance_env().items():
        if redacted(value) != value:  # a URL with a password (a server of your own): never printed
            print(f"# {name} is not printed: its URL holds a password. Export it yourself, or put "
                  "the password in a libpq password file (?passfile=) instead of the URL", file=sys.stderr)
            continue
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from llmops_dagster.infra import database
    from llmops_dagster.infra.settings import llmops_home

    resource = _database()
    if args.action == "stop":
        stopped = database.stop_embedded_server(
            resource.embedded_data_dir or llmops_home() / "pg"
        )
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
        return 0
    url = resource.url()
    with resource.engine().connect() as connection:  # migrated, and this role's login works
        connection.execute(sa.text("SELECT 1"))
    shown = database.redacted(url)  # a password never reaches a terminal or a log
    print(shown if args.action == "url" else f"PostgreSQL ready at {shown}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llmops_dagster.serving import ray_cluster

    resource = _ray_serve()
    if args.port is not None:
        resource = resource.model_copy(update={"local_port": args.port})
    where = f"127.0.0.1:{resource.local_port}"
    if args.action == "status":
        processes = ray_cluster.local_head_processes(resource.local_temp_dir(), resource.local_port)
        print(f"local Ray head running at {where} ({len(processes)} processes, temp dir "
              f"{resource.local_temp_dir()})" if processes else f"no local Ray head is running ({where})")
        return 0
    stopped = resource.stop_local()
    print(f"local Ray head stopped ({stopped} processes at {where})" if stopped
          else "no local Ray head was running")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from llmops_dagster.infra import ui

    auth_proxy = args.behind_auth_proxy or os.environ.get(ui.AUTH_PROXY_ENV, "")
    try:  # before anything starts: the database, the webserver, the daemon
        ui.check_binding(args.host, args.operate, auth_proxy)
        ui.check_port_free(args.host, args.port)
    except ui.UiRefused as error:
        print(f"llmops ui: {error}", file=sys.stderr)
        return 2
    _prepare_instance_env()
    return ui.run_ui(dict(os.environ), host=args.host, port=args.port, operate=args.operate)


def cmd_status(_: argparse.Namespace) -> int:
    """Registry, Ray Serve and Dagster side by side: do they agree, and what is about to change."""
    import dagster as dg

    from llmops_dagster.loop import runs
    from schedules.jobs import SERVING_JOBS

    engine = _database().engine()
    promotion = registry.current_promotion(engine)
    serve = _ray_serve()
    served = serve.served_version()
    if promotion is None:
        print("registry      no version in production")
    else:
        print(f"registry      {promotion.version} in production since {promotion.at:%Y-%m-%d %H:%M:%S} "
              f"({promotion.actor}: {promotion.reason[:80]})")
    print(f"served        {served or 'nothing answers'} at {serve.url()}")
    agree = promotion is not None and served == promotion.version
    _print_feedback_status(engine, promotion)
    _prepare_instance_env()
    with dg.DagsterInstance.get() as instance:
        pending = runs.in_flight(instance, SERVING_JOBS)
    for run in pending:
        print(f"run           {run.run_id} {run.job_name} {run.status.value} "
              f"(trigger {run.tags.get('llmops/trigger', 'person')})")
    if not pending:
        print("run           none queued or running")
    if promotion is not None:
        print("agreement     " + ("yes" if agree else "NO: serving_reconciler requests a deploy "
                                  "(or run `llmops run --job deploy`)"))
    return 0 if agree or promotion is None else 1


def _print_feedback_status(engine: sa.Engine, promotion) -> None:
    """Ratings (stored, counted, and counted on the production version since its promotion) and
    corrections by review state."""
    from llmops_dagster.feedback import curation
    from llmops_dagster.serving import traffic_log
    from resources.loop_settings import LoopSettings

    counts = traffic_log.traffic_counts(engine)
    since = ""
    if promotion is not None:  # as rollback_guard judges it: at most max_votes_per_actor an actor
        cap = LoopSettings().max_votes_per_actor
        live = traffic_log.live_rate(engine, promotion.version, since=promotion.at, max_votes_per_actor=cap)
        since = (f"; {live.ratings} counted on {promotion.version} since its promotion "
                 f"({live.negative:g} negative, from {live.actors} raters, at most {cap} each)")
    print(f"ratings       {counts['ratings']} stored, {counts['counted_ratings']} counted (sent with "
          f"a credential){since}")
    reviews = curation.review_counts(engine)
    print(f"reviews       {reviews['pending']} corrections waiting for review (llmops feedback review); "
          f"{reviews['accepted']} accepted, {reviews['rejected']} rejected")


# Markdown tables worth reading in a terminal: the eval table, the policy decision, the registry.
TABLES_IN_SUMMARY = ("metrics", "decision", "registry")


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
        for name in TABLES_IN_SUMMARY:
            if name in metadata:
                print(f"\n  {name}:\n" + "\n".join(f"  {line}" for line in str(metadata[name]).splitlines()))
    for evaluation in result.get_asset_check_evaluations():
        verdict = "PASSED" if evaluation.passed else "FAILED"
        description = evaluation.description or ""
        print(f"\ncheck {evaluation.asset_check_key.name}: {verdict}  {description}")


def cmd_run(args: argparse.Namespace) -> int:
    """Execute the job in this process: one line per step event on the terminal, everything the
    run prints (Dagster's events, warnings, progress bars, training output) in a log file under
    $LLMOPS_HOME/logs/; then the summary, sample traffic and a trace."""
    import uuid
    import warnings

    try:
        run_config = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as error:
        print(f"llmops run: --config is not JSON: {error.msg} at character {error.pos}", file=sys.stderr)
        return 2
    except RecursionError:
        print("llmops run: --config is not JSON this decoder reads: nested too deep", file=sys.stderr)
        return 2
    if not isinstance(run_config, dict):
        print("llmops run: --config must be a JSON object ({\"ops\": {...}})", file=sys.stderr)
        return 2
    # Warnings while loading the definitions and the instance (beta APIs, platform folders) go to
    # the run's log file with the rest of what the libraries say.
    with warnings.catch_warnings(record=True) as loading_warnings:
        import dagster as dg

        from llmops_dagster.definitions import defs

        jobs = sorted(job.name for job in defs.jobs or [])
        if args.job not in jobs:
            print(f"llmops run: --job {_shown(args.job)} is not a job; one of {jobs}", file=sys.stderr)
            return 2
        from llmops_dagster.training import launch

        try:  # what the platform executes is the operator's deployment setting, never run config
            launch.refuse_deployment_settings(run_config)
        except launch.TrainingConfigError as error:
            print(f"llmops run: --config: {error}", file=sys.stderr)
            return 2
        try:
            dg.validate_run_config(defs.resolve_job_def(args.job), run_config)
        except dg.DagsterInvalidConfigError as error:
            # Dagster's messages end with the whole schema ("Expected: ..."): the entry is enough.
            problems = "; ".join(" ".join(e.message.split(" Expected:")[0].split()) for e in error.errors)
            print(f"llmops run: --config does not fit job {args.job}: {(problems or str(error))[:500]}",
                  file=sys.stderr)
            return 2
        _prepare_instance_env()
        instance = dg.DagsterInstance.get()
    from llmops_dagster.infra import run_progress
    from llmops_dagster.infra.settings import llmops_home

    job = defs.resolve_job_def(args.job)
    run_id = str(uuid.uuid4())
    log_file = run_progress.log_path(llmops_home() / "logs", run_id)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as log:
        log.writelines(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                       for w in loading_warnings)
    print(f"llmops run: job {args.job}, run {run_id}\n  full log (Dagster events, warnings, training "
          f"output): {log_file}", flush=True)
    result = run_progress.execute_with_progress(job, instance, log_file, run_config=run_config,
                                                run_id=run_id)
    _print_summary(result)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"\nstep {event.step_key} failed: {event.event_specific_data.error.message}")
        print(f"\nrun {result.run_id} FAILED; it is in the Dagster UI (make ui)\n  full log: {log_file}",
              file=sys.stderr)
        return 1
    print(f"\nrun {result.run_id} succeeded; see it in the Dagster UI (make ui)\n  full log: {log_file}")
    served = result.asset_materializations_for_node("serving_deployment")
    if served and not args.no_traffic:
        metadata = served[-1].metadata
        response_id = _sample_traffic(metadata["url"].value, metadata["model_version"].value)
        if response_id is None:
            return 0
        print("\n== llmops trace " + response_id + " ==")
        return cmd_trace(argparse.Namespace(response_id=response_id, rows=5, html="", ui_url=None))
    return 0


# Questions not in the training split (new order numbers and phrasings), each with the answer the
# synthetic set's rules give, so that the sample traffic shows and rates whether the model is right.
SAMPLE_QUESTIONS = (
    ("Where is my order A12345?", "order_status", {"order": "A12345"}),
    ("How do I factory reset my Aurora Hub?", "reset_device", {"product": "Aurora Hub"}),
    ("How long is the warranty on the Aurora Camera?", "warranty_check", {"product": "Aurora Camera"}),
    ("Please cancel order A67890.", "cancel_order", {"order": "A67890"}),
    ("Is express shipping free if I buy a Aurora Speaker?", "shipping_cost",
     {"carrier": "express", "product": "Aurora Speaker"}),
)


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _sample_traffic(url: str, model_version: str) -> str | None:
    """Ask the model this run deployed a few questions and rate each answer by whether it is the
    expected one (+1 or -1, with the answer's feedback token, so the rating counts; no correction:
    nothing here becomes training data). An answer from another model version (someone else's
    deployment on the same port) is not rated. Returns the first response id of this model."""
    from llmops_dagster.dataset.synthetic_data import reference_answer
    from llmops_dagster.evaluation.scoring import exact_match

    print(f"\n== sample traffic to {url} (model {model_version}) ==")
    first = None
    for question, intent, fields in SAMPLE_QUESTIONS:
        answer = _post(f"{url}/v1/generate", {"prompt": question})
        if answer["model_version"] != model_version:
            print(f"  {url} answered with model {answer['model_version']}, not {model_version} "
                  "deployed by this run: no sample ratings sent")
            return None
        expected = reference_answer(intent, **fields)
        right = bool(exact_match(answer["text"], expected))
        stored = _post(f"{url}/v1/feedback", {"response_id": answer["response_id"],
                                              "rating": 1 if right else -1, "client_id": "make-run",
                                              "feedback_token": answer["feedback_token"]})
        print(f"  {question!r}\n    -> {answer['text']!r}\n       ({answer['latency_ms']:.0f} ms; "
              f"{'right' if right else 'WRONG, expected ' + repr(expected)}; rated "
              f"{'+1' if right else '-1'}, feedback {stored['status']})")
        first = first or answer["response_id"]
    return first


def cmd_quarantine(args: argparse.Namespace) -> int:
    from llmops_dagster.dataset import dataset_store

    rows = dataset_store.newest_quarantined(_database().engine(), args.n)
    for source, row_number, reasons in rows:
        print(f"{source} row {row_number}: {'; '.join(reasons)}")
    if not rows:
        print("quarantine is empty")
    return 0


def _actor(args: argparse.Namespace) -> str:
    return args.by or os.environ.get("USER") or "unknown"


def _models_list(engine: sa.Engine, _: argparse.Namespace) -> None:
    versions = registry.list_versions(engine)
    for model in versions:
        print(f"{model.version:24} {model.stage:10} dataset {model.dataset_version}  "
              f"base {model.base_model_version}  approver {model.approver or '-'}  "
              f"created {model.created_at:%Y-%m-%d %H:%M:%S}")
    if not versions:
        print("the model registry is empty")


def _models_show(engine: sa.Engine, args: argparse.Namespace) -> None:
    model = registry.get(engine, args.version)
    for name, value in vars(model).items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
        print(f"{name:20} {_printable(str(shown))}")
    print("\naudit log:")
    for entry in registry.audit_log(engine, args.version):
        print(f"  {entry['at']:%Y-%m-%d %H:%M:%S}  {entry['from_stage'] or '-'} -> {entry['to_stage']}  "
              f"by {_printable(entry['actor'])}: {_printable(entry['reason'])}")


def _models_approve(engine: sa.Engine, args: argparse.Namespace) -> None:
    model = registry.promote(engine, args.version, actor=_actor(args), reason=args.reason)
    print(f"model version {model.version} is in production (approved by {model.approver})")


def _models_reject(engine: sa.Engine, args: argparse.Namespace) -> None:
    model = registry.reject(engine, args.version, actor=_actor(args), reason=args.reason)
    print(f"model version {model.version} is rejected")


def _models_rollback(engine: sa.Engine, args: argparse.Namespace) -> None:
    model = registry.rollback(engine, actor=_actor(args), reason=args.reason)
    print(f"rolled back: model version {model.version} is in production again")


def cmd_models(args: argparse.Namespace) -> int:
    try:
        args.action(_database().engine(), args)
    except registry.RegistryError as error:
        print(f"llmops models: {error}", file=sys.stderr)
        return 2
    return 0


def _add_models_parser(commands) -> None:
    models = commands.add_parser("models", help="the model registry")
    models.set_defaults(handler=cmd_models)
    actions = models.add_subparsers(dest="models_command", required=True)
    actions.add_parser("list", help="registered versions, newest first").set_defaults(action=_models_list)
    show = actions.add_parser("show", help="one version and its audit log")
    show.add_argument("version", type=plain_text)
    show.set_defaults(action=_models_show)
    approve = actions.add_parser("approve", help="promote a version to production")
    approve.add_argument("version", type=plain_text)
    approve.add_argument("--by", type=person, help="approver (default: $USER)")
    approve.add_argument("--reason", type=reason, default="approved by hand")
    approve.set_defaults(action=_models_approve)
    reject = actions.add_parser("reject", help="withdraw a candidate")
    reject.add_argument("version", type=plain_text)
    reject.add_argument("--reason", type=reason, required=True)
    reject.add_argument("--by", type=person, help="who decides (default: $USER)")
    reject.set_defaults(action=_models_reject)
    rollback = actions.add_parser("rollback", help="restore the previous production version")
    rollback.add_argument("--reason", type=reason, required=True)
    rollback.add_argument("--by", type=person, help="who decides (default: $USER)")
    rollback.set_defaults(action=_models_rollback)


def cmd_keys(args: argparse.Namespace) -> int:
    from llmops_dagster.serving import credentials

    engine = _database().engine()
    try:
        if args.keys_command == "create":
            key, secret = credentials.create_key(engine, args.name, args.role, created_by=_actor(args))
            # The key goes to stdout alone, so `KEY=$(llmops keys create ...)` captures just it.
            print(f"created {key.role} key {key.name}; it is shown this once:", file=sys.stderr)
            print(secret)
        elif args.keys_command == "revoke":
            key = credentials.revoke_key(engine, args.name, revoked_by=_actor(args))
            print(f"key {_printable(key.name)} revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}")
        else:
            keys = credentials.list_keys(engine)
            for key in keys:
                # Names from before the alphabet of key_name, and --by, are printed escaped.
                state = (f"revoked {key.revoked_at:%Y-%m-%d %H:%M} by {_printable(key.revoked_by)}"
                         if key.revoked_at else "live")
                print(f"{_printable(key.name):24} {key.role:9} {key.key_prefix}...  created "
                      f"{key.created_at:%Y-%m-%d %H:%M} by {_printable(key.created_by)}  {state}")
            if not keys:
                print("no API keys yet: llmops keys create NAME --role client|rater|reviewer")
    except credentials.CredentialError as error:
        print(f"llmops keys: {error}", file=sys.stderr)
        return 2
    return 0


def _review_interactively(engine: sa.Engine, actor: str) -> int:
    from llmops_dagster.feedback import review

    queue = review.pending(engine, limit=1000)
    if queue.empty:
        print("no correction is waiting for review")
        return 0
    decided = 0
    for row in queue.itertuples(index=False):
        print(f"\nfeedback {row.feedback_id} on answer {row.response_id} (model {row.model_version}, "
              f"rater {row.rater}, {'counted' if row.counted else 'not counted'})")
        print(f"  question    {row.prompt!r}\n  answer      {row.answer!r}\n  correction  {row.correction!r}")
        choice = ""
        while choice not in ("a", "r", "s", "q"):
            try:
                choice = input("  [a]ccept, [r]eject, [s]kip, [q]uit? ").strip().lower()[:1]
            except EOFError:
                choice = "q"
        if choice == "q":
            break
        if choice in ("a", "r"):
            decision = review.decide(engine, int(row.feedback_id), "accept" if choice == "a" else "reject",
                                     actor, "decided in llmops feedback review")
            decided += 1
            print(f"  -> {decision.state} by {decision.reviewed_by}")
    print(f"\n{decided} corrections decided; {len(queue) - decided} left for later")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from llmops_dagster.feedback import review

    engine = _database().engine()
    actor = _actor(args)
    try:
        if args.feedback_command == "purge-answers":
            answers, ratings = review.purge_answers(engine, args.until, actor=actor, reason=args.reason)
            print(f"deleted {answers} answers logged before {args.until:%Y-%m-%d %H:%M:%S} and purged "
                  f"{len(ratings)} ratings of them")
            for line in ratings.report_lines():  # files redacted, model versions flagged
                print(f"  {line}")
            return 0
        if args.feedback_command == "purge":
            which = review.PurgeFilter(ids=tuple(args.id or ()), key_name=args.key, since=args.since,
                                       until=args.until)
            purged = review.purge(engine, which, actor=actor, reason=args.reason)
            print(f"purged {len(purged)} feedback rows" + (f": {purged[:20]}" if purged else ""))
            for line in purged.report_lines():  # files redacted, model versions flagged
                print(f"  {line}")
            return 0
        if not (args.accept or args.reject):
            return _review_interactively(engine, actor)
        for ids, decision in ((args.accept or [], "accept"), (args.reject or [], "reject")):
            for feedback_id in ids:
                result = review.decide(engine, feedback_id, decision, actor, args.note or "")
                print(f"feedback {result.feedback_id}: {result.state} by {result.reviewed_by}")
    except review.ReviewError as error:
        print(f"llmops feedback: {error}", file=sys.stderr)
        return 2
    return 0


def _add_trust_parsers(commands) -> None:
    keys = commands.add_parser("keys", help="API keys of clients, raters and reviewers")
    keys.set_defaults(handler=cmd_keys)
    key_actions = keys.add_subparsers(dest="keys_command", required=True)
    create = key_actions.add_parser("create", help="a new key, printed once")
    create.add_argument("name", type=key_name, help="letters, digits, '.', '_' or '-' (1 to 64)")
    create.add_argument("--role", required=True, choices=["client", "rater", "reviewer"])
    create.add_argument("--by", type=person, help="who creates it (default: $USER)")
    key_actions.add_parser("list", help="every key, never the key itself")
    revoke = key_actions.add_parser("revoke", help="revoke a key (its name is never reused)")
    revoke.add_argument("name", type=plain_text)
    revoke.add_argument("--by", type=person, help="who revokes it (default: $USER)")

    feedback = commands.add_parser("feedback", help="review corrections, purge feedback")
    feedback.set_defaults(handler=cmd_feedback)
    actions = feedback.add_subparsers(dest="feedback_command", required=True)
    review_parser = actions.add_parser("review", help="accept or reject corrections waiting for review")
    review_parser.add_argument("--accept", type=row_id, nargs="+", metavar="ID")
    review_parser.add_argument("--reject", type=row_id, nargs="+", metavar="ID")
    review_parser.add_argument("--note", type=reason, help="why (kept in the audit log)")
    review_parser.add_argument("--by", type=person, help="reviewer (default: $USER)")
    purge = actions.add_parser("purge", help="delete feedback rows, leaving audit records")
    purge.add_argument("--id", type=row_id, nargs="+", metavar="ID")
    purge.add_argument("--key", type=plain_text, help="rows sent with this API key (its name)")
    purge.add_argument("--since", type=timestamp, help="rows created at or after (ISO 8601)")
    purge.add_argument("--until", type=timestamp, help="rows created before (ISO 8601)")
    purge.add_argument("--reason", type=reason, required=True, help="why (kept in the audit log)")
    purge.add_argument("--by", type=person, help="who purges (default: $USER)")
    answers = actions.add_parser("purge-answers",
                                 help="delete answers (request_log) logged before a time, and their ratings")
    answers.add_argument("--until", type=timestamp, required=True, help="answers logged before (ISO 8601)")
    answers.add_argument("--reason", type=reason, required=True, help="why (kept in the audit log)")
    answers.add_argument("--by", type=person, help="who purges (default: $USER)")


def _ui_url(given: str | None) -> str:
    """The Dagster UI a trace page links to: --ui-url, else $LLMOPS_DAGSTER_UI_URL, else the
    read-only UI a running `llmops ui` recorded, else make ui's default address."""
    from llmops_dagster.infra import ui
    from llmops_dagster.infra.settings import SettingError

    configured = os.environ.get("LLMOPS_DAGSTER_UI_URL", "").strip()
    if configured and not given:
        try:
            http_url(configured)
        except argparse.ArgumentTypeError as error:
            raise SettingError(f"LLMOPS_DAGSTER_UI_URL: {error}") from None
    return given or configured or ui.recorded_url() or ui.DEFAULT_URL


def _write_trace_page(chain: dict, path: str, ui_url: str) -> None:
    """The trace as an HTML page whose products link to the materializations that made them in the
    Dagster UI at `ui_url`; a warning naming it when no UI answers there."""
    import types

    import dagster as dg

    from llmops_dagster.governance.trace import trace_html
    from llmops_dagster.infra import ui
    from llmops_dagster.infra.lineage import materialization_links, model_lineage_versions

    _prepare_instance_env()
    model = types.SimpleNamespace(**chain["model_version"])
    versions = model_lineage_versions(_database().engine(), model)
    versions["serving_deployment"] = model.version
    with dg.DagsterInstance.get() as instance:
        links = materialization_links(instance, versions, base_url=ui_url)
    Path(path).write_text(trace_html(chain, links), encoding="utf-8")  # checked by html_file
    print(f"trace page written to {path}; its links open the Dagster UI at {ui_url}")
    if not ui.answers(ui_url):
        print(f"llmops trace: warning: no Dagster UI answers at {ui_url}, where the page links: start "
              "it with `llmops ui` (pages then link to wherever it serves), or name it with --ui-url",
              file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from llmops_dagster.governance.trace import TraceError, trace
    from resources.embedder import EmbedderResource

    try:  # ranked with the embedder of dataset_embeddings (the code location's: the default)
        chain = trace(_database().engine(), args.response_id, nearest=args.rows,
                      embed=EmbedderResource().embed)
    except TraceError as error:
        print(f"llmops trace: {error}", file=sys.stderr)
        return 2
    if args.html:
        try:
            _write_trace_page(chain, args.html, _ui_url(args.ui_url))
        except OSError as error:
            print(f"llmops trace: --html {_shown(args.html)}: {error.strerror}", file=sys.stderr)
            return 2
    response, model = chain["response"], chain["model_version"]
    prompts, dataset, rows = chain["prompt_set"], chain["dataset"], chain["training_rows"]
    print(f"response      {response['response_id']} at {response['created_at']:%Y-%m-%d %H:%M:%S}")
    for turn in response.get("context") or []:  # the conversation before the prompt (chat requests)
        print(f"  {turn['role']:<11} {turn['content'][:100]!r}")
    print(f"  prompt      {response['prompt'][:100]!r}")
    print(f"  answer      {response['response'][:100]!r}")
    print(f"model version {model['version']} ({model['stage']}, approved by {model['approver']}, "
          f"eval report {model['eval_report_id']})")
    print(f"  checkpoint  {model['checkpoint_path']}")
    print(f"  adapter     {model['adapter_path']}")
    print(f"prompt set    {prompts['version']} (template {prompts['template_name']} "
          f"sha {prompts['template_sha']}; {prompts['train_rows']} train / {prompts['eval_rows']} eval)")
    print(f"dataset       {dataset['version']} from {dataset['source']} (input {dataset['input_hash']}: "
          f"{dataset['rows_input']} in = {dataset['rows_accepted']} accepted + "
          f"{dataset['rows_quarantined']} quarantined)")
    print(f"source rows   {rows['count']} training rows ({rows['from_feedback']} from feedback); "
          f"{rows['ranked_by']}:")
    for row in rows["nearest"]:
        distance = "" if row["distance"] is None else f"distance {row['distance']:.4f}  "
        print(f"  row {row['row']:>6}  {distance}{row['prompt'][:60]!r} -> {row['response'][:50]!r}")
    if rows["corrections"]:
        print("corrections   training rows from people's corrections:")
    for c in rows["corrections"]:
        when = f"{c['reviewed_at']:%Y-%m-%d %H:%M:%S}" if c["reviewed_at"] else "-"
        sent_with = f"key {c['api_key']}" if c["api_key"] else "its feedback token"
        print(f"  feedback {c['feedback_id']:>6}  question {c['question'][:60]!r}\n"
              f"                  corrected to {c['corrected_answer'][:60]!r}\n"
              f"                  answer {c['response_id']}  rater {c['rater']} (sent with {sent_with})  "
              f"{c['review_state']} by {c['reviewed_by']} at {when}")
    return 0


def _shown(value: str, limit: int = 60) -> str:
    """`value` quoted for a one-line message: escaped (repr) and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _printable(text: str | None) -> str:
    """Text from the database as it may be printed on a terminal: as is when printable, else
    escaped (a control character in a name or reason could rewrite the terminal)."""
    text = "" if text is None else str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def _bounded_int(low: int, high: int):
    """An argparse type: a whole number from `low` to `high`."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shown(value)} is not a whole number") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
        if number > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {_shown(value)}")
        return number
    return parse


positive_int = _bounded_int(1, 10_000)  # rows to show
row_id = _bounded_int(1, 2**63 - 1)  # a PostgreSQL bigint id
tcp_port = _bounded_int(1, 65_535)


def utf8_text(value: str) -> str:
    """An argparse type: text that is valid UTF-8 (a terminal may pass undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return value


def plain_text(value: str) -> str:
    """An argparse type: one line of UTF-8 text without control characters, 1 to 200 characters."""
    utf8_text(value)
    if not value.isprintable():
        raise argparse.ArgumentTypeError(f"{_shown(value)} holds a control character or line break")
    if not value.strip() or len(value) > 200:
        raise argparse.ArgumentTypeError("must be 1 to 200 characters, not blank")
    return value


def reason(value: str) -> str:
    """An argparse type: why (kept in an audit log): one line, not blank, at most 2000 characters."""
    utf8_text(value)
    if not value.strip():
        raise argparse.ArgumentTypeError("must say why: it is empty")
    if not value.isprintable():
        raise argparse.ArgumentTypeError("holds a control character or line break (one line, please)")
    if len(value) > 2000:
        raise argparse.ArgumentTypeError(f"is {len(value)} characters; at most 2000")
    return value.strip()


def person(value: str) -> str:
    """An argparse type: who acts (an audit log's actor): one line, not blank, at most 64 characters."""
    utf8_text(value)
    if not value.strip() or len(value) > 64 or not value.isprintable():
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not a name (1 to 64 printable characters)")
    return value.strip()


KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def key_name(value: str) -> str:
    """An argparse type: an API key's name, as credentials.create_key accepts it."""
    if not KEY_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not a key name: 1 to 64 letters, digits, "
                                         "'.', '_' or '-'")
    return value


def html_file(value: str) -> str:
    """An argparse type: a file to write, in a folder that exists, not a folder itself."""
    utf8_text(value)
    path = Path(value)
    if not value or path.is_dir():
        raise argparse.ArgumentTypeError(f"{_shown(value)} is a folder, not a file")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{_shown(value)}: its folder does not exist")
    return value


def http_url(value: str) -> str:
    """An argparse type: an http:// or https:// address (the page's links point there)."""
    from urllib.parse import urlsplit

    utf8_text(value)
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or not value.isprintable():
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not an http:// or https:// address")
    return value


def host_name(value: str) -> str:
    """An argparse type: an address or host name to bind (checked for loopback by `llmops ui`)."""
    utf8_text(value)
    if not value or len(value) > 253 or not value.isprintable() or " " in value:
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not an address")
    return value


def timestamp(value: str):
    """An argparse type: an ISO 8601 date or time (UTC when it names no zone)."""
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(utf8_text(value))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{_shown(value)} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def response_id(value: str) -> str:
    """An argparse type: a response id as /v1/generate returns it (a UUID, any case)."""
    import uuid

    try:
        return str(uuid.UUID(utf8_text(value)))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError("must be a response id (a UUID) as /v1/generate returns it"
                                         ) from None


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the argument on stderr, exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="materialize a job into the persistent instance")
    run.add_argument("--job", type=utf8_text, default="main")
    run.add_argument("--config", type=utf8_text, default="", help="run config as JSON")
    run.add_argument("--no-traffic", action="store_true", help="skip the sample requests and trace")
    run.set_defaults(handler=cmd_run)
    commands.add_parser("env", help="environment for dagster dev").set_defaults(handler=cmd_env)
    commands.add_parser("status", help="registry, served version and runs in flight, side by side"
                        ).set_defaults(handler=cmd_status)
    db = commands.add_parser("db", help="the platform database")
    db.add_argument("action", choices=["start", "stop", "url"])
    db.set_defaults(handler=cmd_db)
    serve = commands.add_parser("serve", help="the local Ray head serving runs on")
    serve.add_argument("action", choices=["stop", "status"])
    serve.add_argument("--port", type=tcp_port, help="GCS port of the local head (default 6390)")
    serve.set_defaults(handler=cmd_serve)
    ui = commands.add_parser("ui", help="the Dagster UI: read-only, or --operate for this OS user")
    ui.add_argument("--host", type=host_name, default="127.0.0.1",
                    help="where the webserver listens: loopback, unless --behind-auth-proxy")
    ui.add_argument("--port", type=tcp_port, default=3000, help="port of the webserver (1-65535)")
    ui.add_argument("--operate", action="store_true",
                    help="the operating UI (launch runs, switch schedules and sensors) on loopback, "
                         "under a secret path kept in $LLMOPS_HOME/ui/operate_url (mode 0600)")
    ui.add_argument("--behind-auth-proxy", type=plain_text, metavar="NAME",
                    help="the authenticating proxy in front of a non-loopback --host (or "
                         "$LLMOPS_UI_AUTH_PROXY); read-only UI only")
    ui.set_defaults(handler=cmd_ui)
    quarantine = commands.add_parser("quarantine", help="newest quarantined rows")
    quarantine.add_argument("-n", type=positive_int, default=20, help="rows to show (1-10000)")
    quarantine.set_defaults(handler=cmd_quarantine)
    _add_models_parser(commands)
    _add_trust_parsers(commands)
    trace = commands.add_parser("trace", help="lineage of a served answer back to its source rows")
    trace.add_argument("response_id", type=response_id)
    trace.add_argument("--rows", type=positive_int, default=5,
                       help="training rows to show, nearest to the question first")
    trace.add_argument("--html", type=html_file,
                       help="also write the trace as an HTML page to this file")
    trace.add_argument("--ui-url", type=http_url,
                       help="the Dagster UI the page links to (default $LLMOPS_DAGSTER_UI_URL, else "
                            "the read-only UI `llmops ui` serves, else http://127.0.0.1:3000)")
    trace.set_defaults(handler=cmd_trace)
    return parser


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
DATABASE_URL_SETTINGS = ("LLMOPS_DATABASE_URL", "LLMOPS_DATABASE_OWNER_URL", "LLMOPS_DAGSTER_DATABASE_URL")
# psycopg's first line when a server cannot be reached or refuses the login (not a failed query).
_CONNECTION_FAILURES = ("connection to server", "could not connect", "could not translate host",
                        "password authentication failed", "no password supplied", "fatal:")


def _redacted_text(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


def _connection_refusal(error: BaseException) -> str | None:
    """One line for a database that cannot be reached or refuses the login, naming the settings
    that chose it (passwords redacted); None for any other error."""
    from llmops_dagster.infra.database import redacted

    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "OperationalError":  # sqlalchemy's, psycopg2's or psycopg's
            first = str(getattr(seen, "orig", None) or seen).strip().splitlines()
            line = " ".join(first[0].split()) if first else type(seen).__name__
            if line.lower().startswith(_CONNECTION_FAILURES) or "connection to server" in line:
                named = [f"{name}={redacted(os.environ[name].strip())}" for name in DATABASE_URL_SETTINGS
                         if os.environ.get(name, "").strip()]
                where = ("check " + ", ".join(named)) if named else \
                    "the embedded server under $LLMOPS_HOME/pg (LLMOPS_DATABASE_URL is not set)"
                return _redacted_text(f"the database cannot be used ({line[:300]}); {where}")
        seen = seen.__cause__ or seen.__context__
    return None


def _log_unexpected(command: str) -> Path:
    """The current exception's traceback in a new 0600 file under $LLMOPS_HOME/logs/ (or the
    temporary folder, when that cannot be written); its path."""
    import tempfile
    import time
    import traceback

    text = _redacted_text(traceback.format_exc())
    name = f"llmops-{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-"
    try:
        from llmops_dagster.infra.settings import llmops_home

        folder = llmops_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, path = tempfile.mkstemp(prefix=name, suffix=".log", dir=folder)
    except Exception:  # noqa: BLE001 (an unusable LLMOPS_HOME must not hide the first error)
        descriptor, path = tempfile.mkstemp(prefix=name, suffix=".log")
    with os.fdopen(descriptor, "w", encoding="utf-8") as log:
        log.write(text)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 a bad argument or setting (one line naming it), 1 anything else
    (one line and the log file holding its traceback). Bad arguments exit through SystemExit(2)."""
    args = build_parser().parse_args(argv)
    from llmops_dagster.infra.database import DatabaseConfigError
    from llmops_dagster.infra.embedded_auth import EmbeddedAuthError
    from llmops_dagster.infra.settings import SettingError

    try:
        return args.handler(args)
    except (SettingError, DatabaseConfigError, EmbeddedAuthError) as error:
        print(f"llmops {args.command}: {' '.join(str(error).split())}", file=sys.stderr)  # a setting, named
        return 2
    except KeyboardInterrupt:
        print(f"llmops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (the one place that turns a traceback into a log file)
        refusal = _connection_refusal(error)
        if refusal is not None:
            print(f"llmops {args.command}: {refusal}", file=sys.stderr)
            return 2
        log = _log_unexpected(args.command)
        message = _redacted_text(" ".join(str(error).split()))[:200]
        print(f"llmops {args.command}: unexpected error {type(error).__name__}: {message}; "
              f"traceback in {log}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
