"""Validation of 1,000,000 rows: our Great Expectations path against the same checks written by
hand in vectorized pandas (Arrow-backed string kernels), in one run.

Each measurement runs in a fresh process (so peak memory is that path's alone), after one warm-up
call on 1,000 rows whose time (mostly imports) is printed apart, on the same deterministic data:
synthetic support examples made unique by a ticket number, with 1% bad rows (missing values, PII,
oversize text, exact duplicates). Prints seconds, peak RSS above the loaded data, and the ratio
ours / baseline (goal: at most 1.5).

    python benchmarks/bench_validation.py [--rows N] [--repeat R]
"""

import argparse
import multiprocessing
import resource
import time

import numpy as np
import pandas as pd
import pyarrow as pa
from results import record

from llmops_dagster.dataset.formats import ColumnMapping, to_examples
from llmops_dagster.dataset.synthetic_data import generate_examples
from llmops_dagster.dataset.validation import (
    PII_PATTERNS,
    SPLIT_HASH_KEY,
    TOKEN_PATTERN,
    ValidationRules,
    validate_examples,
)

ARROW_TEXT = pd.ArrowDtype(pa.large_string())


def make_rows(n_rows: int) -> pd.DataFrame:
    base = pd.DataFrame(generate_examples(n_rows=5000, seed=1))
    frame = base.iloc[np.arange(n_rows) % len(base)].reset_index(drop=True)
    frame["prompt"] = frame["prompt"] + " (ticket T" + pd.Series(np.arange(n_rows)).astype(str) + ")"
    frame = frame.astype(object)
    rng = np.random.default_rng(0)
    bad = rng.choice(n_rows, size=n_rows // 100, replace=False)
    kinds = np.arange(len(bad)) % 5
    frame.loc[bad[kinds == 0], "prompt"] = None
    frame.loc[bad[kinds == 1], "prompt"] = "write to someone@example.com please"
    frame.loc[bad[kinds == 2], "response"] = "call 415-555-0100"
    frame.loc[bad[kinds == 3], "response"] = "word " * 400
    duplicates = bad[kinds == 4]
    pair = ["prompt", "response"]
    frame.loc[duplicates, pair] = frame.loc[duplicates - 1, pair].to_numpy()
    frame.insert(0, "_row_number", np.arange(1, n_rows + 1))
    frame["_parse_error"] = None
    frame["_utf8_error"] = None
    return frame


def baseline_validate(frame: pd.DataFrame, rules: ValidationRules) -> set[int]:
    """The same rules by hand: masks per check, then reasons for the failing rows."""
    failures: list[tuple[np.ndarray, str]] = []
    texts = {}
    for column in ("prompt", "response"):  # required; `intent` is read as the optional slice
        values = frame[column]
        is_null = values.isna().to_numpy()
        is_text = values.map(type).eq(str).to_numpy()
        failures += [(is_null, f"{column}: value is missing"),
                     (~is_null & ~is_text, f"{column}: expected text")]
        texts[column] = values.where(is_text, "").astype(ARROW_TEXT)
        tokens = texts[column].str.count(TOKEN_PATTERN).to_numpy()
        high = rules.max_prompt_tokens if column == "prompt" else rules.max_response_tokens
        failures.append((is_text & ((tokens < rules.min_tokens) | (tokens > high)), f"{column}: length"))
        for label, pattern in PII_PATTERNS.items():
            failures.append((texts[column].str.contains(pattern).to_numpy(), f"{column}: {label}"))
    normalized = texts["prompt"].str.lower().str.replace(r"\s+", " ", regex=True).str.strip()
    bucket = pd.util.hash_array(normalized.to_numpy(dtype=object), hash_key=SPLIT_HASH_KEY) % 10_000
    split = np.where(bucket < rules.eval_fraction * 10_000, "eval", "train")
    in_train = split == "train"
    train_keys = set(normalized[in_train])
    failures.append((~in_train & normalized.isin(train_keys).to_numpy(), "leakage"))
    keys = frame[["prompt", "response"]].fillna("").astype(str)
    failures.append((keys.duplicated(keep="first").to_numpy(), "duplicate"))
    failures += [(frame["_parse_error"].notna().to_numpy(), "parse"),
                 (frame["_utf8_error"].notna().to_numpy(), "utf8")]
    bad = np.zeros(len(frame), dtype=bool)
    for mask, _ in failures:
        bad |= mask
    reasons: dict[int, list[str]] = {int(i): [] for i in np.flatnonzero(bad)}
    for mask, reason in failures:
        for index in np.flatnonzero(mask):
            reasons[int(index)].append(reason)
    return {int(frame.at[i, "_row_number"]) for i in reasons}


def ours(frame: pd.DataFrame, rules: ValidationRules) -> set[int]:
    """The platform's path: the source's columns read as examples (formats.py), then the suite."""
    examples = to_examples(frame, "auto", ColumnMapping())
    return set(validate_examples(examples, rules).quarantined["row_number"].tolist())


def measure(path: str, n_rows: int, queue) -> None:
    frame = make_rows(n_rows)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    function = ours if path == "ours" else baseline_validate
    # One warm-up call on 1,000 rows: imports (GX takes about 2 s) are paid once per process,
    # whatever the row count, so they are reported apart, not mixed into the per-row cost.
    start = time.perf_counter()
    function(frame.head(1000), ValidationRules())
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    quarantined = function(frame, ValidationRules())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((seconds, (peak - rss_loaded) / 1024, len(quarantined), hash(frozenset(quarantined)),
               warm_up))


def run_isolated(path: str, n_rows: int) -> tuple[float, float, int, int]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(path, n_rows, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: is the measuring process still alive?
            if not process.is_alive():
                raise SystemExit(f"the {path} measurement died (exit code {process.exitcode})") from None
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list] = {"ours": [], "baseline": []}
    for _ in range(args.repeat):
        for path in results:  # interleaved, so machine noise hits both alike
            results[path].append(run_isolated(path, args.rows))
    best = {path: min(runs) for path, runs in results.items()}
    if best["ours"][2:4] != best["baseline"][2:4]:
        raise SystemExit(f"the two paths disagree on the quarantined rows: {best}")
    quarantined = best["ours"][2]
    print(f"validation of {args.rows:,} rows ({quarantined:,} quarantined by both), best of {args.repeat}")
    print(f"{'path':32} {'seconds':>9} {'peak MiB over data':>20} {'first call (s)':>15}")
    for path, label in (("ours", "ours (Great Expectations 1.x)"),
                        ("baseline", "baseline (hand-written pandas)")):
        seconds, peak, _, _, warm_up = best[path]
        print(f"{label:32} {seconds:9.2f} {peak:20.0f} {warm_up:15.2f}")
    ratio = best["ours"][0] / best["baseline"][0]
    print(f"ratio ours/baseline: {ratio:.2f}x (goal: at most 1.4x)")
    record("validation", f"GX validation of {args.rows:,} rows / hand-written pandas", ratio, "x",
           "at most 1.4x", ratio <= 1.4)


if __name__ == "__main__":
    main()
