"""Over a thousand hostile requests against the real served model, and proof that nothing broke.

What it touches: the session's served model (the `served_model` fixture) over HTTP on 127.0.0.1 only,
POST /v1/generate and POST /v1/feedback, sent by 8 threads with urllib (no proxy); and the session's
PostgreSQL, which it reads (information_schema, every public table's row count, request_log, feedback)
and which the accepted requests write to (new rows in request_log and feedback). No files, no other host.

The payloads: SQL injection strings and generated variants in every text field, bodies of about 1 MB,
invalid UTF-8, wrong JSON types for every field, control characters (NUL must be refused), unicode edge
cases (emoji, RTL marks, lone surrogate escapes), unknown fields, empty and malformed bodies, and
feedback for unknown or garbage response_ids. Every answer must be 2xx or 4xx (never 5xx, never a
dropped connection); each one whose outcome the API contract fixes must get exactly that outcome; every
accepted prompt and rating must be stored exactly as sent; the schema must be unchanged and no table may
lose rows.
"""

import json
import random
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa

THREADS = 8
TOKENS = 4  # max_new_tokens of every generate call meant to be accepted: keeps the flood fast
MB = 1_000_000
OK, BAD, ANY = "ok", "bad", "any"  # expected outcome: 200, a 4xx, either (must then be stored right)


@dataclass
class Case:
    path: str  # /v1/generate or /v1/feedback
    body: bytes
    expect: str | int  # OK, BAD, ANY, or an exact status code
    label: str
    content_type: str = "application/json"


@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no HTTP answer at all (connection error, timeout)
    body: bytes = b""
    error: str = ""
    parsed: object = field(default=None)


# ---------------------------------------------------------------------------------------------- payloads

SQLI = [
    "'; DROP TABLE request_log; --",
    "' OR 1=1 --",
    "\"; DELETE FROM feedback; --",
    "' OR '1'='1",
    "1; DROP TABLE feedback",
    "'); DROP TABLE request_log; --",
    "' UNION SELECT response_id, prompt, response FROM request_log --",
    "admin'--",
    "' OR 1=1#",
    "'/**/OR/**/1=1/**/--",
    "'; SELECT pg_sleep(10); --",
    "'; TRUNCATE request_log CASCADE; --",
    "'; UPDATE feedback SET rating = 1; --",
    "'; ALTER TABLE request_log DROP COLUMN prompt; --",
    "'; CREATE TABLE pwned (x int); --",
    "'; COPY request_log TO '/tmp/pwned'; --",
    "$$; DROP TABLE feedback; $$",
    "E'\\x27; DROP TABLE request_log; --",
    "%(id)s %(prompt)s %s %%",
    ":id :prompt); DROP TABLE request_log; --",
    "\\'; DROP TABLE request_log; --",
    "' || (SELECT version()) || '",
    "'; INSERT INTO feedback (response_id, client_id, rating) VALUES (gen_random_uuid(), 'x', 1); --",
    "\u2019; DROP TABLE request_log; --",
    "\uff07 OR 1=1 --",
    "'; GRANT ALL ON request_log TO PUBLIC; --",
    "'; DO $x$ BEGIN EXECUTE 'DROP TABLE feedback'; END $x$; --",
    "\"\"\"; DROP TABLE request_log; --",
    "{{ 7*7 }} {% for x in range(10**9) %}{% endfor %} {{ config }}",
    "<script>alert(document.cookie)</script><img src=x onerror=alert(1)>",
    "../../../../etc/passwd",
    "${jndi:ldap://127.0.0.1/x}",
    "'; SET session_replication_role = replica; DELETE FROM request_log; --",
    "1' AND (SELECT COUNT(*) FROM pg_tables) > 0 --",
    "'; LISTEN x; NOTIFY x; --",
    "'\x3b DROP TABLE request_log\x3b --",
]


def sqli_variants(base: str, index: int) -> list[str]:
    """Eight spellings of one injection string, all valid prompts."""
    return [
        base,
        base.upper(),
        base.replace(" ", "/**/"),
        f"x{base} -- {index}",
        (base + " ") * 3,
        base.replace("'", "''"),
        base.replace(" ", "\t").replace(";", ";\n"),
        urllib.parse.quote(base),
    ]


CONTROLS = [chr(c) for c in range(0x01, 0x20)] + ["\x7f"]

UNICODE = [
    "😀", "👨\u200d👩\u200d👧\u200d👦", "🇩🇪🇯🇵", "👍🏽", "\u202eevil\u202c", "abc\u200fdef",
    "\u061c\u0627\u0644",
    "שלום עולם", "مرحبا", "e\u0301" * 100, "Z\u0351\u0364\u0300\u0301\u0302" * 20, "\ufeffbom", "x\uffff",
    "x\ufffe", "\U0010ffff", "\U000e0001\U000e0041", "\ue000private", "漢字かなカナ", "\u2028line\u2029para",
    "\x85next", "\u00adsoft", "\u200b\u200c\u200d", "\U0001d54f\U0001d552\U0001d55d", "İıßẞ", "ﷺ" * 10,
    "\u0301leading-combining", "a" * 2000, "😀" * 2000,
]

WHITESPACE_ONLY = [" ", "\t\n\r", "\u00a0", "\u3000", "\x1c\x1d\x1e\x1f", "\u2003\u2009", " " * 2000]

LONE_SURROGATES = ["\\ud800", "\\udfff", "x\\udc00\\ud800y", "\\ud800\\u0041", "end\\ud83d", "\\ude00start"]

INVALID_UTF8 = [
    b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xe2\x82\x28", b"\xf0\x28\x8c\xbc",
    b"\xf0\x90\x28\xbc", b"\xf8\xa1\xa1\xa1\xa1", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
    b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\x80", b"\xbf", b"\xc3", b"\xe2\x82",
]

WRONG_TYPES = [5, 5.5, -1, 0, [], ["x"], {}, {"a": 1}, None, True, False, 1e308, 10**30]

MALFORMED = [
    "{", "}", "[", "\"", "nul", "tru", "{\"prompt\": \"x\"", "{\"prompt\": \"x\",}", "{'prompt': 'x'}",
    "{\"prompt\": x}", "{prompt: \"x\"}", "{\"prompt\": \"x\"}}", "{\"prompt\": \"x\"} trailing",
    "{\"prompt\": \"\\x41\"}", "{\"prompt\": \"\\u12\"}", "{\"prompt\": \"\\\"}", "{\"prompt\": \"\"\"}",
    "{\"prompt\":\"a\" \"max_new_tokens\":4}", "{\"prompt\": \"x\", \"max_new_tokens\": 04}",
    "{\"prompt\": \"x\", \"max_new_tokens\": +4}", "{\"prompt\": \"x\", \"max_new_tokens\": 0x4}",
    "{\"prompt\": \"x\", \"max_new_tokens\": .4}", "/* c */ {\"prompt\": \"x\"}", "{\"prompt\": \"x\"}\x00",
    "\x00", "{\"prompt\": \"x\", \"max_new_tokens\": NaN}", "{\"prompt\": NaN}", "{\"prompt\": Infinity}",
    "{\"prompt\": \"x\", \"max_new_tokens\": -Infinity}", "{\"prompt\": \"x\", \"max_new_tokens\": 1e999}",
    "{\"response_id\": NaN, \"rating\": Infinity}", "{\"rating\": -Infinity}", "[" * 100_000,
    "{\"a\":" * 50_000, "{\"prompt\": \"x\", \"max_new_tokens\": " + "9" * 5000 + "}",
    "{\"prompt\": \"x\"\x01}", "\ufeff\ufeff{\"prompt\": \"x\"}",
]


def storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def generate_expect(payload) -> str:
    """The contract of POST /v1/generate for a decoded JSON body."""
    if not isinstance(payload, dict) or "prompt" not in payload:
        return BAD
    if set(payload) - {"prompt", "max_new_tokens"}:
        return BAD
    prompt, tokens = payload["prompt"], payload.get("max_new_tokens", 48)
    if type(prompt) is not str or type(tokens) is not int:
        return BAD
    if not (1 <= len(prompt) <= 2000 and prompt.strip() and storable(prompt) and 1 <= tokens <= 128):
        return BAD
    return OK


def feedback_expect(payload, known: set[str]) -> str | int:
    """The contract of POST /v1/feedback for a decoded JSON body: OK, 404 (unknown id) or BAD."""
    fields = {"response_id", "rating", "correction", "comment", "client_id", "feedback_token"}
    if not isinstance(payload, dict) or not {"response_id", "rating"} <= set(payload) <= fields:
        return BAD
    rid, rating = payload["response_id"], payload["rating"]
    if type(rid) is not str or len(rid) > 64 or type(rating) is not int or rating not in (-1, 1):
        return BAD
    for name in ("correction", "comment"):
        value = payload.get(name)
        if value is not None and (type(value) is not str or len(value) > 4000 or not storable(value)):
            return BAD
    client = payload.get("client_id", "anonymous")
    if type(client) is not str or not 1 <= len(client) <= 128 or not storable(client):
        return BAD
    token = payload.get("feedback_token")
    if token is not None and (type(token) is not str or len(token) > 64 or not storable(token)):
        return BAD
    try:
        canonical = str(uuid.UUID(rid))
    except ValueError:
        return BAD
    return OK if canonical in known else 404


def dumps(payload, index: int) -> bytes:
    """JSON text, escaped (\\uXXXX) or raw UTF-8 by turns; escaped when it holds lone surrogates."""
    ascii_only = index % 2 == 0 or _has_surrogate(payload)
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8")


def _has_surrogate(payload) -> bool:
    text = json.dumps(payload, ensure_ascii=False)
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def gen(payload, label: str, index: int, expect: str | None = None) -> Case:
    assert expect in (None, generate_expect(payload)), label  # the case list agrees with the contract
    return Case("/v1/generate", dumps(payload, index), expect or generate_expect(payload), label)


def generate_cases() -> tuple[list[Case], list[Case]]:
    """(seed, rest): the seed cases are accepted prompts whose response_ids the feedback cases rate."""
    cases: list[Case] = []
    i = 0
    for b, base in enumerate(SQLI):
        for v, text in enumerate(sqli_variants(base, b)):
            i += 1
            cases.append(gen({"prompt": text, "max_new_tokens": 1 + i % TOKENS}, f"sqli[{b}.{v}]", i, OK))
    seed, cases = cases[:40], cases[40:]
    for c, ch in enumerate(CONTROLS):
        i += 1
        cases.append(gen({"prompt": f"before{ch}after", "max_new_tokens": TOKENS}, f"control[{c}]", i, OK))
        cases.append(gen({"prompt": ch, "max_new_tokens": TOKENS}, f"control-alone[{c}]", i + 1))
        raw = b'{"prompt": "a' + ch.encode() + b'b", "max_new_tokens": 4}'
        cases.append(Case("/v1/generate", raw, ANY, f"control-raw[{c}]"))
        i += 1
    for n, payload in enumerate([{"prompt": "a\x00b"}, {"prompt": "\x00"}, {"prompt": "x" * 10 + "\x00"},
                                 {"prompt": "ok", "\x00": 1}]):
        cases.append(gen({"max_new_tokens": TOKENS, **payload}, f"nul[{n}]", n, BAD))
    cases.append(Case("/v1/generate", b'{"prompt": "a\x00b", "max_new_tokens": 4}', BAD, "nul-raw"))
    cases.append(Case("/v1/generate", b'{"prompt": "\\u0000", "max_new_tokens": 4}', BAD, "nul-escape"))
    for u, text in enumerate(UNICODE):
        cases.append(gen({"prompt": text, "max_new_tokens": TOKENS}, f"unicode[{u}]", u, OK))
    for w, text in enumerate(WHITESPACE_ONLY):
        cases.append(gen({"prompt": text, "max_new_tokens": TOKENS}, f"whitespace[{w}]", w, BAD))
    cases.append(gen({"prompt": "a" * 2001, "max_new_tokens": TOKENS}, "too-long", 0, BAD))
    cases.append(gen({"prompt": "😀" * 2001, "max_new_tokens": TOKENS}, "too-long-emoji", 1, BAD))
    cases.append(Case("/v1/generate", b'{"prompt": "\\ud83d\\ude00 pair", "max_new_tokens": 4}', OK,
                      "surrogate-pair-escape"))
    for s, text in enumerate(LONE_SURROGATES):
        body = ('{"prompt": "' + text + '", "max_new_tokens": 4}').encode()
        cases.append(Case("/v1/generate", body, BAD, f"lone-surrogate[{s}]"))
    for t, value in enumerate([*WRONG_TYPES, "", "5"]):
        cases.append(gen({"prompt": value, "max_new_tokens": TOKENS}, f"prompt-type[{t}]", t))
    for t, value in enumerate([*(v for v in WRONG_TYPES if v != 5), "4", "four", "", 4.0, 4.5, [4], 129,
                               -10**30, 1e3, 1]):
        cases.append(gen({"prompt": "types", "max_new_tokens": value}, f"tokens-type[{t}]", t))
    for e, key in enumerate(["model", "temperature", "__proto__", "constructor", "prompt ", "Prompt", "",
                             "response_id", SQLI[0], "max_new_tokens\x00", "stream", "😀"]):
        cases.append(gen({"prompt": "extra", "max_new_tokens": TOKENS, key: 1}, f"extra[{e}]", e, BAD))
    for m, payload in enumerate([{}, {"max_new_tokens": TOKENS}, [], [{"prompt": "x"}], "x", 5, None, True]):
        cases.append(gen(payload, f"shape[{m}]", m, BAD))
    cases.append(gen({"prompt": "first", "prompt2": "x"}, "extra-prompt2", 0, BAD))
    cases.append(Case("/v1/generate", b'{"prompt": "first", "prompt": "second dup", "max_new_tokens": 4}',
                      OK, "duplicate-key"))
    return seed, cases + body_level_cases("/v1/generate") + big_generate_cases()


def body_level_cases(path: str) -> list[Case]:
    """Bodies that are not a JSON object at all, or not UTF-8, or not declared as JSON."""
    valid = {"prompt": "valid body", "max_new_tokens": TOKENS}
    cases = [Case(path, b"", BAD, f"empty{path}", content_type=ct)
             for ct in ("application/json", "text/plain", "application/json; charset=utf-8")]
    cases += [Case(path, text.encode("utf-8", "surrogatepass"), BAD, f"malformed[{m}]{path}")
              for m, text in enumerate(MALFORMED)]
    for b, bad in enumerate(INVALID_UTF8):
        cases += [Case(path, b'{"prompt": "x' + bad + b'y", "max_new_tokens": 4}', BAD, f"utf8-value[{b}]"),
                  Case(path, b'{"pr' + bad + b'ompt": "x", "max_new_tokens": 4}', BAD, f"utf8-key[{b}]"),
                  Case(path, bad + b'{"prompt": "x", "max_new_tokens": 4}', BAD, f"utf8-lead[{b}]")]
    for codec in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        cases.append(Case(path, json.dumps(valid).encode(codec), ANY, f"codec-{codec}{path}"))
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/json; charset=latin-1", "application/vnd.api+json", "application/xml"):
        cases.append(Case(path, json.dumps(valid).encode(), ANY, f"content-type[{ct}]{path}",
                          content_type=ct))
    return cases


def big_generate_cases() -> list[Case]:
    """Bodies of about 1 MB."""
    valid = json.dumps({"prompt": "padded but valid", "max_new_tokens": TOKENS}).encode()
    rng = random.Random(7)
    return [
        gen({"prompt": "A" * MB, "max_new_tokens": TOKENS}, "1mb-prompt", 0, BAD),
        gen({"prompt": (SQLI[0] * (MB // len(SQLI[0]))), "max_new_tokens": TOKENS}, "1mb-sqli", 1, BAD),
        gen({"prompt": "😀" * (MB // 4), "max_new_tokens": TOKENS}, "1mb-emoji", 2, BAD),
        gen({"prompt": "x", "max_new_tokens": TOKENS, "pad": "x" * MB}, "1mb-extra", 0, BAD),
        Case("/v1/generate", b" " * MB + valid, OK, "1mb-leading-whitespace"),
        Case("/v1/generate", valid + b"\n" * MB, OK, "1mb-trailing-whitespace"),
        Case("/v1/generate", rng.randbytes(MB), BAD, "1mb-random-bytes"),
        Case("/v1/generate", b"\xff" * MB, BAD, "1mb-ff"),
        Case("/v1/generate", b"[" * MB, BAD, "1mb-nesting"),
        Case("/v1/generate", json.dumps([{"prompt": "x"}] * (MB // 16)).encode(), BAD, "1mb-array"),
        Case("/v1/generate", json.dumps({f"k{n}": n for n in range(MB // 12)}).encode(), BAD, "1mb-keys"),
        Case("/v1/generate", ('{"prompt": "' + "\\ud800" * (MB // 6) + '"}').encode(), BAD, "1mb-surrogates"),
        Case("/v1/generate", ('{"prompt": "' + "\\u0000" * (MB // 6) + '"}').encode(), BAD, "1mb-nul"),
    ]


def feedback_cases(ids: list[str], tokens: dict[str, str]) -> list[Case]:
    """Ratings of the seed responses with hostile content, plus garbage and unknown response_ids;
    `tokens`: each seed response's feedback token."""
    known = set(ids)
    cases: list[Case] = []
    n = 0

    def fb(payload: dict, label: str, expect: str | int | None = None) -> None:
        nonlocal n
        n += 1
        full = {"response_id": ids[n % len(ids)], "rating": (1, -1)[n % 2], "client_id": f"hostile-{n}",
                **payload}
        full = {k: v for k, v in full.items() if v is not _DROP}
        assert expect in (None, feedback_expect(full, known)), label
        cases.append(Case("/v1/feedback", dumps(full, n), expect or feedback_expect(full, known), label))

    for b, base in enumerate(SQLI):
        fb({"correction": base}, f"fb-sqli-correction[{b}]", OK)
        fb({"comment": base.upper(), "correction": None}, f"fb-sqli-comment[{b}]", OK)
        fb({"client_id": f"{base[:100]}#{b}"}, f"fb-sqli-client[{b}]", OK)
        fb({"response_id": base[:64]}, f"fb-sqli-id[{b}]", BAD)
    for c, ch in enumerate(CONTROLS):
        fb({"correction": f"x{ch}y", "comment": ch}, f"fb-control[{c}]", OK)
        fb({"client_id": f"c{ch}{c}"}, f"fb-control-client[{c}]", OK)
    for u, text in enumerate(UNICODE):
        fb({"correction": text, "comment": text[:4000]}, f"fb-unicode[{u}]", OK)
    fb({"client_id": "😀" * 128}, "fb-client-128-emoji", OK)
    for field_name in ("correction", "comment", "client_id"):
        fb({field_name: "a\x00b"}, f"fb-nul-{field_name}", BAD)
        fb({field_name: "\x00"}, f"fb-nul-alone-{field_name}", BAD)
    for s, text in enumerate(LONE_SURROGATES):  # written into the JSON text as \\uXXXX escapes
        for field_name in ("correction", "comment", "client_id", "response_id"):
            base = {"response_id": ids[s], "rating": 1, "client_id": f"lone-{s}-{field_name}"}
            base.pop(field_name, None)
            body = json.dumps(base)[:-1] + f', "{field_name}": "{text}"}}'
            cases.append(Case("/v1/feedback", body.encode(), BAD, f"fb-lone[{s}]-{field_name}"))
    for t, value in enumerate([*WRONG_TYPES, "", "not-a-uuid"]):
        fb({"response_id": value}, f"fb-id-type[{t}]", BAD)
    for t, value in enumerate([*(v for v in WRONG_TYPES if v != -1), "1", "-1", 1.0, -1.0, 2, -2, [1], ""]):
        fb({"rating": value}, f"fb-rating-type[{t}]", BAD)
    for name in ("correction", "comment"):
        for t, value in enumerate([5, 5.5, [], ["x"], {}, True, False, 10**30, "x" * 4001]):
            fb({name: value}, f"fb-{name}-type[{t}]", BAD)
        fb({name: "y" * 4000}, f"fb-{name}-4000", OK)
        fb({name: None}, f"fb-{name}-null", OK)
    for t, value in enumerate([5, None, [], ["x"], {}, True, False, "", "x" * 129, 1.5]):
        fb({"client_id": value}, f"fb-client-type[{t}]", BAD)
    fb({"client_id": "z" * 128}, "fb-client-128", OK)
    fb({"client_id": _DROP}, "fb-client-default", OK)  # "anonymous": stored, not counted
    for e, key in enumerate(["id", "feedback_id", "created_at", "admin", "rating2", "", SQLI[1]]):
        fb({key: 1}, f"fb-extra[{e}]", BAD)
    for m, payload in enumerate([{"response_id": _DROP}, {"rating": _DROP}]):
        fb(payload, f"fb-missing[{m}]", BAD)
    for r in range(20):
        fb({"response_id": str(uuid.UUID(int=random.Random(r).getrandbits(128)))}, f"fb-unknown[{r}]", 404)
    for g, rid in enumerate(["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                             "urn:uuid:" + str(uuid.UUID(int=1)), "{" + str(uuid.UUID(int=2)) + "}",
                             uuid.UUID(int=3).hex, str(uuid.UUID(int=4)).upper()]):
        fb({"response_id": rid}, f"fb-unknown-form[{g}]", 404)
    for g, rid in enumerate(["x", "' OR 1=1 --", "1; DROP TABLE feedback", "../../etc/passwd", "😀" * 32,
                             "00000000-0000-0000-0000-00000000000g", str(uuid.UUID(int=5)) + "0",
                             str(uuid.UUID(int=6))[:-1], "a" * 65, " " + str(uuid.UUID(int=7)),
                             str(uuid.UUID(int=8)) + "\x00", "\u202e" + str(uuid.UUID(int=9))]):
        fb({"response_id": rid}, f"fb-garbage-id[{g}]", BAD)
    for k, rid in enumerate(ids[:6]):  # other spellings of served ids are the same id
        spelled = [rid.upper(), uuid.UUID(rid).hex, "{" + rid + "}", "urn:uuid:" + rid, rid, rid][k]
        fb({"response_id": spelled}, f"fb-spelling[{k}]", OK)
    for k, rid in enumerate(ids[6:12]):
        fb({"response_id": rid + " "}, f"fb-id-space[{k}]", BAD)
    for d in range(10):  # the same rating sent twice at once with its token: one counted, one duplicate
        body = json.dumps({"response_id": ids[d], "rating": -1, "correction": f"dup {SQLI[d]}",
                           "client_id": f"dup-{d}", "feedback_token": tokens[ids[d]]}).encode()
        cases += [Case("/v1/feedback", body, OK, f"fb-dup[{d}]{twin}") for twin in "ab"]

    def big(extra: dict) -> bytes:
        return json.dumps({"response_id": ids[0], "rating": 1, **extra}).encode()

    cases += [
        Case("/v1/feedback", big({"correction": "c" * MB}), BAD, "fb-1mb-correction"),
        Case("/v1/feedback", big({"comment": "\x00" * MB}), BAD, "fb-1mb-nul-comment"),
        Case("/v1/feedback", big({"response_id": "9" * MB}), BAD, "fb-1mb-id"),
        Case("/v1/feedback", big({"client_id": "k" * MB}), BAD, "fb-1mb-client"),
        Case("/v1/feedback", b" " * MB + big({"response_id": ids[1], "client_id": "ws"}), OK, "fb-1mb-ws"),
    ]
    return cases + body_level_cases("/v1/feedback")


_DROP = object()  # a field to leave out of a feedback payload


# ---------------------------------------------------------------------------------------------- sending

def send(opener: urllib.request.OpenerDirector, url: str, case: Case) -> Outcome:
    request = urllib.request.Request(url + case.path, data=case.body, method="POST",
                                     headers={"Content-Type": case.content_type})
    try:
        with opener.open(request, timeout=120) as response:
            outcome = Outcome(case, response.status, response.read())
    except urllib.error.HTTPError as error:
        outcome = Outcome(case, error.code, error.read())
    except Exception as error:  # any failure to get an answer at all is the finding
        return Outcome(case, None, error=repr(error)[:300])
    try:
        outcome.parsed = json.loads(outcome.body)
    except ValueError:
        outcome.parsed = None
    return outcome


def flood(url: str, cases: list[Case]) -> list[Outcome]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(lambda case: send(opener, url, case), cases))


def problem(outcome: Outcome) -> str | None:
    """Why an outcome breaks the contract, or None."""
    status, expect = outcome.status, outcome.case.expect
    if status is None:
        return f"no answer: {outcome.error}"
    if not (200 <= status < 300 or 400 <= status < 500):
        return f"status {status}: {outcome.body[:600]!r}"
    if expect == OK and status != 200:
        return f"expected 200, got {status}: {outcome.body[:300]!r}"
    if expect == BAD and not 400 <= status < 500:
        return f"expected a 4xx, got {status}: {outcome.body[:300]!r}"
    if isinstance(expect, int) and status != expect:
        return f"expected {expect}, got {status}: {outcome.body[:300]!r}"
    if 400 <= status < 500 and not (isinstance(outcome.parsed, dict) and "detail" in outcome.parsed):
        return f"a {status} without a JSON detail: {outcome.body[:300]!r}"
    if status == 200 and not isinstance(outcome.parsed, dict):
        return f"a 200 without a JSON object: {outcome.body[:300]!r}"
    return None


# ---------------------------------------------------------------------------------------------- database

def snapshot(engine: sa.Engine) -> tuple[set, dict]:
    """The public schema's (table, column, type) set and every public table's row count."""
    with engine.connect() as connection:
        columns = {tuple(row) for row in connection.execute(sa.text(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'"))}
        tables = connection.execute(sa.text(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")).scalars().all()
        counts = {name: connection.execute(
            sa.select(sa.func.count()).select_from(sa.table(name))).scalar_one() for name in tables}
    return columns, counts


def stored_prompts(engine: sa.Engine, ids: list[str]) -> dict[str, tuple]:
    query = sa.text("SELECT response_id::text AS id, prompt, response, max_new_tokens, model_version "
                    "FROM request_log WHERE response_id::text IN :ids").bindparams(
        sa.bindparam("ids", expanding=True))
    with engine.connect() as connection:
        return {row.id: row for row in connection.execute(query, {"ids": ids})}


def stored_feedback(engine: sa.Engine, feedback_ids: list[int]) -> dict[int, tuple]:
    query = sa.text("SELECT id, response_id::text AS response_id, client_id, rating, correction, comment, "
                    "counted "
                    "FROM feedback WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True))
    with engine.connect() as connection:
        return {row.id: row for row in connection.execute(query, {"ids": feedback_ids})}


# ---------------------------------------------------------------------------------------------- the test

def test_hostile_payloads_never_5xx_and_store_exactly(served_model):
    url, engine, version = served_model["url"], served_model["engine"], served_model["version"]
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
    columns_before, counts_before = snapshot(engine)

    seed, generate_rest = generate_cases()
    seeded = flood(url, seed)
    assert all(o.status == 200 for o in seeded), [(o.case.label, o.status, o.body[:200]) for o in seeded]
    ids = [o.parsed["response_id"] for o in seeded]
    rest = generate_rest + feedback_cases(ids, {o.parsed["response_id"]: o.parsed["feedback_token"]
                                                for o in seeded})
    random.Random(2024).shuffle(rest)  # generate and feedback interleaved
    outcomes = seeded + flood(url, rest)
    assert len(outcomes) >= 1000

    problems = [(o.case.path, o.case.label, why) for o in outcomes if (why := problem(o))]

    # Every accepted prompt is stored exactly as decoded from the JSON that was sent.
    generated = [o for o in outcomes if o.case.path == "/v1/generate" and o.status == 200]
    rows = stored_prompts(engine, [o.parsed["response_id"] for o in generated])
    for o in generated:
        sent = json.loads(o.case.body)
        row = rows.get(o.parsed["response_id"])
        assert row is not None, f"{o.case.label}: response {o.parsed['response_id']} not in request_log"
        assert row.prompt == sent["prompt"] and row.prompt.encode() == sent["prompt"].encode(), o.case.label
        assert row.max_new_tokens == sent.get("max_new_tokens", 48) <= TOKENS, o.case.label
        assert (row.response, row.model_version) == (o.parsed["text"], version), o.case.label
        assert o.parsed["model_version"] == version

    # Every accepted rating is stored exactly, in a row of its own (duplicates too: nothing a person
    # sent is thrown away); only the token-carrying duplicates count, once per answer.
    rated = [o for o in outcomes if o.case.path == "/v1/feedback" and o.status == 200]
    feedback_rows = stored_feedback(engine, sorted({o.parsed["feedback_id"] for o in rated}))
    assert len(feedback_rows) == len(rated)
    for o in rated:
        sent = json.loads(o.case.body)
        row = feedback_rows[o.parsed["feedback_id"]]
        assert row.response_id == str(uuid.UUID(sent["response_id"])), o.case.label
        assert row.client_id == sent.get("client_id", "anonymous"), o.case.label
        assert (row.rating, row.correction, row.comment) == (
            sent["rating"], sent.get("correction"), sent.get("comment")), o.case.label
        assert row.counted == (o.parsed["status"] == "counted"), o.case.label
        if not o.case.label.startswith("fb-dup"):
            assert o.parsed["status"] == "not counted", o.case.label  # no credential
    duplicates = Counter(o.parsed["status"] for o in rated if o.case.label.startswith("fb-dup"))
    assert duplicates == {"counted": 10, "duplicate": 10}

    # The schema is untouched, no table lost a row, and the logs grew by exactly what was accepted.
    columns_after, counts_after = snapshot(engine)
    assert columns_after == columns_before
    assert set(counts_after) == set(counts_before)
    shrunk = {name for name in counts_before if counts_after[name] < counts_before[name]}
    assert not shrunk, (counts_before, counts_after)
    assert counts_after["request_log"] - counts_before["request_log"] == len(generated)
    assert counts_after["feedback"] - counts_before["feedback"] == len(rated)

    # Last, so that a run shows the storage checks above passed even when some answers broke the contract.
    assert not problems, f"{len(problems)} of {len(outcomes)} broke the contract: {problems[:25]}"
