"""Property: every `llmops` subcommand, given generated bad arguments (random text with control
characters, huge and negative numbers, empty strings, bad times and ids), ends with exit status 0, 1
or 2 and never a traceback; 2 is one line on stderr, 1 names a log file that holds the traceback.

Touches: a fresh database of its own (the commands read and write it), in this process through
`llmops_dagster.cli.main`. Never the UI, a run or Ray: their arguments are generated invalid only,
and `db stop` and `serve stop` (which would stop the session's servers) are never generated.
"""

import json
import re
import uuid
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmops_dagster import cli

SPECIAL = ["", " ", "\t", "\n", "\x00", "\x1b[31m", "\udcff", "-1", "0", "-0", "99999999999999999999",
           str(2**63), str(-(2**70)), "1e9", "nan", "inf", "0x10", "٣", "2024-13-45", "2024-02-30T25:00",
           "9999-12-31T23:59:59+23:59", "0001-01-01T00:00:00-23:59", "yesterday", "not-a-uuid",
           str(uuid.uuid4())[:-1], "../../etc/passwd", "/", "/nonexistent/dir/x.html", "--", "-x",
           "'; DROP TABLE api_keys; --", "a" * 5000, "{", "[1]", "null", '{"ops": {"nope": {}}}',
           '{"resources": {"nope": 1}}']
bad = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=40),
                st.integers(min_value=-(2**80), max_value=2**80).map(str))


def _is_port(value: str) -> bool:
    try:
        return 1 <= int(value) <= 65_535
    except ValueError:
        return False


def _could_start_a_run(config: str) -> bool:
    """Whether `llmops run --config CONFIG` could pass validation: empty (no config) or a JSON object
    without the unknown entry "nope"."""
    try:
        return not config or (isinstance(json.loads(config), dict) and "nope" not in config)
    except (ValueError, RecursionError):
        return False


not_a_port = bad.filter(lambda v: not _is_port(v))
not_a_config = bad.filter(lambda v: not _could_start_a_run(v))
not_a_choice = bad.filter(lambda v: v.strip() not in ("start", "stop", "url", "status"))
any_id = str(uuid.uuid4())

argvs = st.one_of(
    st.tuples(bad).map(lambda v: ["quarantine", "-n", *v]),
    st.tuples(bad).map(lambda v: ["trace", *v]),
    st.tuples(bad).map(lambda v: ["trace", any_id, "--rows", *v]),
    st.tuples(bad).map(lambda v: ["trace", any_id, "--html", *v]),
    st.tuples(bad).map(lambda v: ["trace", any_id, "--ui-url", *v]),
    st.tuples(bad).map(lambda v: ["models", "show", *v]),
    st.tuples(bad, bad).map(lambda v: ["models", "approve", v[0], "--reason", v[1]]),
    st.tuples(bad, bad).map(lambda v: ["models", "approve", v[0], "--by", v[1]]),
    st.tuples(bad, bad).map(lambda v: ["models", "reject", v[0], "--reason", v[1]]),
    st.tuples(bad).map(lambda v: ["models", "rollback", "--reason", *v]),
    st.tuples(bad).map(lambda v: ["models", *v]),
    st.tuples(bad).map(lambda v: ["keys", "create", *v, "--role", "client"]),
    st.tuples(bad).map(lambda v: ["keys", "create", "k", "--role", *v]),
    st.tuples(bad).map(lambda v: ["keys", "revoke", *v]),
    st.tuples(bad).map(lambda v: ["keys", "list", *v]),
    st.tuples(bad).map(lambda v: ["feedback", "review", "--accept", *v]),
    st.tuples(bad).map(lambda v: ["feedback", "review", "--reject", "1", "--note", *v]),
    st.tuples(bad, bad).map(lambda v: ["feedback", "purge", "--id", v[0], "--reason", v[1]]),
    st.tuples(bad).map(lambda v: ["feedback", "purge", "--since", *v, "--reason", "test"]),
    st.tuples(bad).map(lambda v: ["feedback", "purge", "--until", *v, "--reason", "test"]),
    st.tuples(bad).map(lambda v: ["feedback", "purge", "--key", *v, "--reason", "test"]),
    st.tuples(bad, bad).map(lambda v: ["feedback", "purge-answers", "--until", v[0], "--reason", v[1]]),
    st.tuples(not_a_choice).map(lambda v: ["db", *v]),
    st.tuples(not_a_choice).map(lambda v: ["serve", *v]),
    st.tuples(bad).map(lambda v: ["serve", "status", "--port", *v]),
    st.tuples(not_a_port).map(lambda v: ["ui", "--port", *v]),
    st.tuples(bad).map(lambda v: ["ui", "--host", *v, "--port", "0"]),
    st.tuples(bad).map(lambda v: ["ui", "--operate", "--behind-auth-proxy", *v, "--port", "70000"]),
    st.tuples(bad).map(lambda v: ["run", "--job", *v, "--config", '{"nope": 1}']),
    st.tuples(not_a_config).map(lambda v: ["run", "--config", *v]),
    st.tuples(bad).map(lambda v: ["status", *v]),
    st.tuples(bad).map(lambda v: ["env", *v]),
    st.tuples(bad.filter(lambda v: v not in ("run", "ui"))).map(lambda v: [*v]),  # no run, no UI
)
LOG_PATH = re.compile(r"traceback in (/\S+\.log)$")


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(argv=argvs)
def test_no_argument_gives_a_traceback(argv, fresh_database, capsys):
    assert argv[:1] != ["run"] or not _could_start_a_run(argv[argv.index("--config") + 1])
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse: bad arguments (2) or --help (0)
        code = exit_.code or 0
    out, err = capsys.readouterr()
    event(f"{argv[0] if argv else '-'} exit {code}")  # --hypothesis-show-statistics
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err, (argv, err)
    if code == 2:
        assert err.startswith("llmops") and err.count("\n") == 1, (argv, err)
    if code == 1:
        match = LOG_PATH.search(err.strip())
        assert match and Path(match[1]).is_file(), (argv, err)
        assert err.count("\n") == 1, (argv, err)

