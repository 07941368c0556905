"""Row-level validation of instruction examples with a Great Expectations 1.x suite.

`dagster-ge` needs great-expectations < 1.0, so this module wraps GX 1.x itself: it derives the
columns the rules need (token counts, split, duplicate and leakage pointers) with vectorized pandas,
runs one GX suite over the frame with the COMPLETE result format, and turns every unexpected row
index into a reason. Every row ends up either accepted or quarantined with all of its reasons.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmops_dagster.dataset.formats import EXAMPLE_COLUMNS

# A token, for length bounds before any model tokenizer exists: a run of word characters or one
# punctuation mark. It counts about 1.3 tokens per English word, close to a BPE tokenizer.
TOKEN_PATTERN = r"\w+|[^\w\s]"  # nosec B105

# Label -> pattern; the label completes "contains ..." in the reason a row gets. Boundaries are
# consumed ((?:^|[^\w-]) ...) instead of looked around, so pandas runs them in Arrow's RE2 engine
# (about 10x faster than Python's re on a million rows).
PII_PATTERNS: dict[str, str] = {
    "an e-mail address": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "a phone number": r"(?:^|[^\w-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?:$|\W)",
    "a payment card number": r"(?:^|[^\w-])(?:\d[ -]?){12,18}\d(?:$|[^\w-])",
}
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class ValidationRules:
    """What a valid example is. Token counts use TOKEN_PATTERN."""

    required_columns: tuple[str, ...] = ("prompt", "response")
    text_columns: tuple[str, ...] = ("prompt", "response")
    min_tokens: int = field(default=1, metadata={"help": "Shortest accepted prompt or response (tokens)."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Longest accepted prompt (tokens)."})
    max_response_tokens: int = field(default=256, metadata={"help": "Longest accepted response (tokens)."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of distinct prompts in the eval split (when the source has no split column)."})

    def max_tokens(self, column: str) -> int:
        return self.max_prompt_tokens if column == "prompt" else self.max_response_tokens


@dataclass
class ValidationReport:
    """The outcome: accepted rows, quarantined rows with every reason, and per-check counts."""

    rows_input: int
    accepted: pd.DataFrame
    quarantined: pd.DataFrame  # columns: row_number, reasons (list[str]), original_row (JSON text)
    checks: list[dict] = field(default_factory=list)  # check, column, failed_rows
    missing_columns: list[str] = field(default_factory=list)

    @property
    def rows_accepted(self) -> int:
        return len(self.accepted)

    @property
    def rows_quarantined(self) -> int:
        return len(self.quarantined)

    @property
    def quarantined_share(self) -> float:
        return self.rows_quarantined / self.rows_input if self.rows_input else 0.0


def as_text(values: pd.Series) -> pd.Series:
    """Values as pandas' Arrow-backed `str` column ("" for missing, str() of other types): regex
    checks on it run in Arrow's RE2 engine, and GX's own `astype(str)` on it is free."""
    return values.fillna("").astype(str)


def _count_regex(text: pd.Series, pattern: str) -> np.ndarray:
    return pc.count_substring_regex(pa.array(text.array), pattern).to_numpy(zero_copy_only=False)


def count_tokens(values: pd.Series, text: pd.Series | None = None) -> pd.Series:
    """Tokens per value (float); NaN where the value is not text. `text` is `as_text(values)`."""
    text = as_text(values) if text is None else text
    counts = _count_regex(text, TOKEN_PATTERN).astype("float64")
    return pd.Series(counts, index=values.index).where(values.map(type).eq(str))


def normalize_text(text: pd.Series) -> pd.Series:
    """Lower case with runs of whitespace collapsed: the key for leakage between splits."""
    normalized = pc.utf8_trim_whitespace(
        pc.replace_substring_regex(pc.utf8_lower(pa.array(text.array)), r"\s+", " ")
    )
    return pd.Series(normalized.to_numpy(zero_copy_only=False), index=text.index, dtype=object)


# SipHash-2-4 under a fixed key: pandas' vectorized content hash, stable across runs and machines.
SPLIT_HASH_KEY = "llmops-split-v1!"  # exactly 16 bytes


def assign_split(normalized_prompts: pd.Series, eval_fraction: float) -> pd.Series:
    """Deterministic split by content hash: the same prompt always lands in the same split."""
    hashes = pd.util.hash_array(normalized_prompts.to_numpy(dtype=object), hash_key=SPLIT_HASH_KEY)
    buckets = hashes % np.uint64(10_000)
    return pd.Series(np.where(buckets < eval_fraction * 10_000, "eval", "train"),
                     index=normalized_prompts.index)


def add_derived_columns(frame: pd.DataFrame, rules: ValidationRules) -> pd.DataFrame:
    """Columns the suite checks: _<col>_text, _<col>_tokens, split, _duplicate_of, _leaks_from."""
    frame = frame.reset_index(drop=True)
    if "context" in frame.columns:  # earlier turns of a conversation (JSON text), PII-checked too
        frame["_context_text"] = as_text(frame["context"])
    for column in rules.text_columns:
        if column in frame.columns:
            frame[f"_{column}_text"] = as_text(frame[column])
            frame[f"_{column}_tokens"] = count_tokens(frame[column], frame[f"_{column}_text"])

    if "prompt" in frame.columns:
        normalized = normalize_text(frame["_prompt_text"])
        hashed_split = assign_split(normalized, rules.eval_fraction)
        if "split" in frame.columns:
            given = frame["split"].where(frame["split"].isna(), frame["split"].astype(str).str.lower())
            frame["split"] = given.fillna(hashed_split)
        else:
            frame["split"] = hashed_split
        # Train/eval leakage: an eval row whose prompt also appears in the train split.
        in_train = frame["split"].eq("train").to_numpy()
        in_eval = frame["split"].eq("eval").to_numpy()
        leaking = in_eval & normalized.isin(normalized[in_train]).to_numpy()
        frame["_leaks_from"] = _first_match(leaking, normalized, in_train, frame["_row_number"])

    key_columns = [f"_{c}_text" for c in ("prompt", "response") if f"_{c}_text" in frame.columns]
    if key_columns:
        # Exact duplicates: the same prompt and response (after the same earlier turns, in a
        # conversation) as an earlier row; the first one is kept.
        if "_context_text" in frame.columns:
            key_columns.append("_context_text")
        keys = frame[key_columns]
        key = pd.Series(pd.util.hash_pandas_object(keys, index=False).to_numpy(), index=frame.index)
        later = key.duplicated(keep="first").to_numpy()
        frame["_duplicate_of"] = _first_match(later, key, ~later, frame["_row_number"])
    return frame


def _first_match(rows: np.ndarray, keys: pd.Series, candidates: np.ndarray,
                 row_numbers: pd.Series) -> pd.Series:
    """For each row in `rows`, the first row number among `candidates` with the same key, NaN
    elsewhere. `rows` is usually sparse, so only the keys involved are looked up."""
    result = pd.Series(np.nan, index=keys.index)
    if rows.any():
        wanted = keys[rows]
        pool = keys[candidates & keys.isin(wanted).to_numpy()]
        first = row_numbers[pool.index].groupby(pool.to_numpy(), sort=False).first()
        result[rows] = wanted.map(first).to_numpy(dtype="float64")
    return result


@dataclass(frozen=True)
class _Rule:
    """One expectation and the reason a failing row gets; `{value}` takes the row's value."""

    expectation: object
    column: str
    check: str
    reason: str


def build_rules(columns: list[str], rules: ValidationRules) -> list[_Rule]:
    """The suite for the columns present; missing required columns are reported separately."""
    import great_expectations.expectations as gxe

    suite: list[_Rule] = [
        _Rule(gxe.ExpectColumnValuesToBeNull(column="_parse_error"), "_parse_error", "parse",
              "row could not be read: {value}"),
        _Rule(gxe.ExpectColumnValuesToBeNull(column="_utf8_error"), "_utf8_error", "utf8",
              "not valid UTF-8: {value}"),
    ]
    if "_format_error" in columns:  # a chat or instruction record its format cannot read
        suite.append(_Rule(gxe.ExpectColumnValuesToBeNull(column="_format_error"), "_format_error",
                           "format", "{value}"))
    for column in rules.required_columns:
        if column not in columns:
            continue
        suite.append(_Rule(gxe.ExpectColumnValuesToNotBeNull(column=column), column, "not_null",
                           f"{column}: value is missing"))
        suite.append(_Rule(gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"), column,
                           "type", f"{column}: expected text, got {{value!r}}"))
    for column in rules.text_columns:
        if column not in columns:
            continue
        low, high = rules.min_tokens, rules.max_tokens(column)
        suite.append(_Rule(
            gxe.ExpectColumnValuesToBeBetween(column=f"_{column}_tokens", min_value=low,
                                              max_value=high),
            f"_{column}_tokens", "length",
            f"{column}: {{value:.0f}} tokens, outside the bounds {low}..{high}"))
        for label, pattern in PII_PATTERNS.items():
            suite.append(_Rule(gxe.ExpectColumnValuesToNotMatchRegex(column=f"_{column}_text",
                                                                     regex=pattern),
                               f"_{column}_text", f"pii: {label.split(' ', 1)[1]}",
                               f"{column}: contains {label} (PII)"))
    if "_context_text" in columns:
        for label, pattern in PII_PATTERNS.items():
            suite.append(_Rule(gxe.ExpectColumnValuesToNotMatchRegex(column="_context_text",
                                                                     regex=pattern),
                               "_context_text", f"pii: {label.split(' ', 1)[1]}",
                               f"context: contains {label} (PII)"))
    if "split" in columns:
        suite.append(_Rule(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
                           "split", "split", "split: {value!r} is not one of 'train', 'eval'"))
    if "_leaks_from" in columns:
        suite.append(_Rule(gxe.ExpectColumnValuesToBeNull(column="_leaks_from"), "_leaks_from",
                           "leakage", "train/eval leakage: the prompt is also in the train split "
                           "at row {value:.0f}"))
    if "_duplicate_of" in columns:
        suite.append(_Rule(gxe.ExpectColumnValuesToBeNull(column="_duplicate_of"), "_duplicate_of",
                           "duplicate", "exact duplicate of row {value:.0f}"))
    return suite


@cache
def _gx_context():
    """One ephemeral GX context a process, with its progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    # GX fingerprints every pandas batch smaller than HASH_THRESHOLD bytes by hashing all of its
    # values (a batch marker, pandas_data_fingerprint, that nothing here reads): 2.2 s of 18 on
    # 1M rows. A threshold of 0 skips it; the checks themselves are unchanged.
    pandas_execution_engine.HASH_THRESHOLD = 0
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _run_suite(frame: pd.DataFrame, suite: list[_Rule]) -> list[list[int]]:
    """Run the suite on the frame; return the failing row indices for each rule, in order."""
    import great_expectations as gx

    context = _gx_context()
    name = f"examples_{len(context.suites.all())}"
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    expectation_suite = context.suites.add(gx.ExpectationSuite(name=name))
    for index, rule in enumerate(suite):
        rule.expectation.meta = {"rule": index}
        expectation_suite.add_expectation(rule.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=expectation_suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False},
    )
    failing: list[list[int]] = [[] for _ in suite]
    for outcome in result.results:
        rule_index = outcome.expectation_config.meta["rule"]
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            message = outcome.exception_info.get("exception_message")
            raise RuntimeError(f"validation rule {suite[rule_index].check!r} on column "
                               f"{suite[rule_index].column!r} could not run: {message}")
        failing[rule_index] = list(outcome.result.get("unexpected_index_list") or [])
    return failing


def _original_row(row: dict, source_columns: list[str]) -> str:
    """The whole row as the source held it, as JSON text (ASCII-escaped, so any byte survives),
    with personal data masked (mask_pii): quarantine keeps why and where, not the data itself."""
    if isinstance(row.get("_raw"), str):
        return json.dumps({"_raw": mask_pii(row["_raw"])})
    values = {c: _masked(row[c]) for c in source_columns if c in row and not _is_missing(row[c])}
    return json.dumps(values, default=str, sort_keys=True)


FEEDBACK_COLUMNS = ["prompt", "response", "context", "slice", "feedback_id"]  # a correction's row


def _from_feedback(row: dict) -> bool:
    return not _is_missing(row.get("feedback_id"))


def _masked(value):
    """A source value with mask_pii applied to every text inside it (a chat's turns included)."""
    if isinstance(value, str):
        return mask_pii(value)
    if hasattr(value, "tolist") and not isinstance(value, bytes):  # Arrow/NumPy lists
        value = value.tolist()
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return value


def mask_pii(text: str) -> str:
    """`text` with every letter and digit of a PII_PATTERNS match replaced by '*': the shape (and
    so the reason) stays readable, the address, number or card does not."""
    for pattern in _pii_patterns():
        text = pattern.sub(_star_letters_and_digits, text)
    return text


@cache
def _pii_patterns() -> list:
    import re

    return [re.compile(pattern) for pattern in PII_PATTERNS.values()]


def _star_letters_and_digits(match) -> str:
    import re

    return re.sub(r"[^\W_]", "*", match.group(0))


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def validate_examples(frame: pd.DataFrame, rules: ValidationRules | None = None) -> ValidationReport:
    """Validate every row; return accepted rows and quarantined rows with all their reasons."""
    rules = rules or ValidationRules()
    origins = frame.attrs.get("origins", {})
    source_columns = frame.attrs.get("source_columns") or [c for c in frame.columns
                                                           if not c.startswith("_")]
    frame = frame.reset_index(drop=True)
    derived = add_derived_columns(frame, rules)
    missing = [c for c in rules.required_columns if c not in derived.columns]
    suite = build_rules(list(derived.columns), rules)
    checked = derived.drop(columns=["_raw"], errors="ignore")
    failing = _run_suite(checked, suite)

    reasons: dict[int, list[str]] = {}
    if missing:
        every_row = "missing required column(s): " + ", ".join(
            f"{c!r} (from source column {origins[c]!r}, raw_examples.columns.{c})"
            if origins.get(c) not in (None, c) else repr(c) for c in missing)
        for index in range(len(derived)):
            reasons[index] = [every_row]
    checks = [{"check": "required_columns", "column": ", ".join(missing) or "-",
               "failed_rows": len(derived) if missing else 0}]
    for rule, indices in zip(suite, failing, strict=True):
        checks.append({"check": rule.check, "column": rule.column, "failed_rows": len(indices)})
        values = derived[rule.column].to_numpy(dtype=object)
        for index in indices:
            reasons.setdefault(index, []).append(rule.reason.format(value=values[index]))

    bad = np.zeros(len(derived), dtype=bool)
    bad[list(reasons)] = True
    quarantined = pd.DataFrame(
        {
            "row_number": derived.loc[bad, "_row_number"].astype(int).to_numpy(),
            "reasons": [reasons[i] for i in np.flatnonzero(bad)],
            "original_row": [_original_row(row, FEEDBACK_COLUMNS if _from_feedback(row) else source_columns)
                             for row in frame.iloc[np.flatnonzero(bad)].to_dict(orient="records")],
        }
    )
    keep = [c for c in EXAMPLE_COLUMNS if c != "split"] + ["feedback_id", "split", "_row_number"]
    accepted = derived.loc[~bad, [c for c in keep if c in derived.columns]].reset_index(drop=True)
    return ValidationReport(
        rows_input=len(derived),
        accepted=accepted,
        quarantined=quarantined,
        checks=checks,
        missing_columns=missing,
    )


def data_version(accepted: pd.DataFrame) -> str:
    """Content hash of the accepted rows (order, columns and values): the dataset's version."""
    digest = hashlib.sha256()
    columns = sorted(c for c in accepted.columns if c != "_row_number")
    digest.update(json.dumps(columns).encode())
    for record in accepted[columns].itertuples(index=False, name=None):
        digest.update(json.dumps(record, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
