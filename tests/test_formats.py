"""Bring your own data: each format people fine-tune from (mapped columns, chat records, instruction
records, a `datasets` folder or files with named splits) read into examples, with its own
malformations quarantined with reasons and counts that reconcile. Real GX validation, no database;
the last test runs raw_examples and validated_dataset on a mapped file through Dagster."""

import json

import dagster as dg
import pandas as pd
import pytest

from llmops_dagster.dataset.formats import ColumnMapping, FormatError, to_examples
from llmops_dagster.dataset.raw_data import load_examples
from llmops_dagster.dataset.sources import SourceError
from llmops_dagster.dataset.validation import validate_examples

SYSTEM = {"role": "system", "content": "You are the Aurora support assistant."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def reasons_by_row(report) -> dict[int, list[str]]:
    return dict(zip(report.quarantined["row_number"], report.quarantined["reasons"], strict=True))


def assert_reconciles(report, rows):
    assert report.rows_input == rows == report.rows_accepted + report.rows_quarantined


def test_mapped_columns_read_a_support_ticket_file_and_slice_by_its_category(tmp_path):
    source = tmp_path / "tickets.csv"
    source.write_text(
        "question,answer,category\n"
        "Where is order A10001?,Order A10001 ships today.,order_status\n"
        "Reset my hub,Hold the button for 10 s.,reset\n"
        ",An answer without a question.,reset\n"
        "Mail me at jo@example.com,Done.,account\n", encoding="utf-8")
    mapping = ColumnMapping(prompt="question", response="answer", slice="category")
    report = validate_examples(load_examples(source, "auto", mapping))
    assert_reconciles(report, 4)
    assert list(report.accepted["slice"]) == ["order_status", "reset"]
    assert list(report.accepted["prompt"]) == ["Where is order A10001?", "Reset my hub"]
    reasons = reasons_by_row(report)
    assert reasons[3] == ["prompt: value is missing"]
    assert reasons[4] == ["prompt: contains an e-mail address (PII)"]
    stored = json.loads(report.quarantined["original_row"].iloc[0])
    assert stored == {"answer": "An answer without a question.", "category": "reset"}  # as the source held it


def test_a_mapped_column_the_source_lacks_is_named_with_its_setting(tmp_path):
    source = write_jsonl(tmp_path / "t.jsonl", [{"question": "Hi", "reply": "Hello."}] * 3)
    report = validate_examples(load_examples(source, "columns",
                                             ColumnMapping(prompt="question", response="answer")))
    assert report.rows_quarantined == 3
    assert reasons_by_row(report)[1] == [
        "missing required column(s): 'response' (from source column 'answer', raw_examples.columns.response)"]


def test_without_a_slice_column_every_stage_has_one_slice(tmp_path):
    source = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"Where is order A{i}?",
                                                 "response": f"Order A{i} ships."} for i in range(5)])
    report = validate_examples(load_examples(source))
    assert report.rows_accepted == 5 and "slice" not in report.accepted.columns
    from llmops_dagster.prompts.rendering import TEMPLATE, PromptRenderer
    from llmops_dagster.prompts.templates import render_records

    records = render_records(PromptRenderer(kind=TEMPLATE, name="t", text="{{ prompt }}"), report.accepted)
    assert set(records["slice"]) == {"all"}


def test_chat_records_take_the_last_assistant_turn_and_quarantine_broken_conversations(tmp_path):
    good_multi = {"messages": [SYSTEM, user("My hub is offline."), assistant("Restart it."),
                               user("Still offline."), assistant("Hold reset for 10 s.")],
                  "category": "connectivity"}
    records = [
        {"messages": [user("Where is order A10001?"), assistant("Order A10001 ships today.")]},
        good_multi,
        {"messages": [user("Hello?")]},                                              # 3: no assistant
        {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]},           # 4: unknown role
        {"messages": [user("Hi"), assistant("  ")]},                                 # 5: empty content
        {"messages": [assistant("Hi!"), user("Where is my order?"), assistant("Which one?")]},  # 6
        {"messages": [user("A"), assistant("B"), SYSTEM, user("C"), assistant("D")]},  # 7: late system
        {"messages": [user("A"), assistant("B"), user("C")]},                        # 8: ends with user
        {"messages": "not a list"},                                                  # 9
    ]
    frame = load_examples(write_jsonl(tmp_path / "chat.jsonl", records),
                          mapping=ColumnMapping(slice="category"))
    assert frame.attrs["format"] == "chat"
    report = validate_examples(frame)
    assert_reconciles(report, 9)
    first, second = report.accepted.to_dict(orient="records")
    assert (first["prompt"], first["response"]) == ("Where is order A10001?", "Order A10001 ships today.")
    assert pd.isna(first["context"])  # a single-turn example
    assert (second["prompt"], second["response"], second["slice"]) == (
        "Still offline.", "Hold reset for 10 s.", "connectivity")
    assert json.loads(second["context"]) == good_multi["messages"][:3]
    reasons = reasons_by_row(report)
    assert reasons[3][0] == "messages: no assistant turn to learn from"
    assert reasons[4][0].startswith("messages[1]: unknown role 'bot'")
    assert reasons[5][0] == "messages[1] (assistant): empty content"
    assert reasons[6][0].startswith("messages[0]: 'assistant' after 'the start' (turns out of order")
    assert reasons[7][0].startswith("messages[2]: 'system' after 'assistant' (turns out of order")
    assert reasons[8][0].startswith("messages[2]: the conversation ends with a user turn")
    assert reasons[9][0] == "messages: expected a list of turns, got str"
    check = {c["check"]: c["failed_rows"] for c in report.checks}
    assert check["format"] == 7
    stored = json.loads(report.quarantined["original_row"].iloc[0])
    assert stored == records[2]  # the conversation as sent


def test_a_conversation_with_pii_in_an_earlier_turn_is_quarantined_masked(tmp_path):
    record = {"messages": [user("I am jo@example.com"), assistant("Hi Jo."), user("Order?"),
                           assistant("Which one?")]}
    report = validate_examples(load_examples(write_jsonl(tmp_path / "c.jsonl", [record])))
    assert reasons_by_row(report)[1] == ["context: contains an e-mail address (PII)"]
    assert "jo@example.com" not in report.quarantined["original_row"].iloc[0]


def test_instruction_records_join_instruction_and_input_and_quarantine_what_is_missing(tmp_path):
    records = [
        {"instruction": "Summarize the ticket.", "input": "Hub offline since Monday.",
         "output": "Hub offline since Monday."},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
        {"instruction": "Say hello.", "output": None},                              # 3
        {"instruction": "", "input": "x", "output": "y"},                           # 4
        {"instruction": "Count.", "input": 3, "output": "three"},                   # 5
    ]
    frame = load_examples(write_jsonl(tmp_path / "alpaca.jsonl", records))
    assert frame.attrs["format"] == "instruction"
    report = validate_examples(frame)
    assert_reconciles(report, 5)
    assert list(report.accepted["prompt"]) == ["Summarize the ticket.\n\nHub offline since Monday.",
                                               "Say hello."]
    reasons = reasons_by_row(report)
    assert reasons[3][0] == "output: value is missing"
    assert reasons[4][0] == "instruction: empty"
    assert reasons[5][0] == "input: expected text, got int"


def test_a_datasets_folder_keeps_its_train_and_test_splits(tmp_path):
    import datasets

    train = [{"messages": [user(f"Where is order A{i}?"), assistant(f"Order A{i} ships.")]}
             for i in range(6)]
    test = [{"messages": [user(f"Is order B{i} late?"), assistant(f"Order B{i} is on time.")]}
            for i in range(3)] + [{"messages": [user("Only a question")]}]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(folder))
    report = validate_examples(load_examples(folder))
    assert_reconciles(report, 10)
    assert report.accepted.groupby("split").size().to_dict() == {"eval": 3, "train": 6}
    assert list(reasons_by_row(report)) == [10]  # numbered on through the splits


def test_jsonl_and_parquet_files_named_by_split_are_read_with_their_splits(tmp_path):
    folder = tmp_path / "by_split"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": f"Reset hub {i}", "response": "Hold it."}
                                         for i in range(4)] + [{"prompt": "no answer"}])
    pd.DataFrame([{"prompt": "Where is A1?", "response": "Shipped."},
                  {"prompt": "Where is A2?", "response": "Shipped."}]).to_parquet(
        folder / "validation-00000-of-00001.parquet")
    report = validate_examples(load_examples(folder))
    assert_reconciles(report, 7)
    assert report.accepted.groupby("split").size().to_dict() == {"eval": 2, "train": 4}
    assert reasons_by_row(report)[5] == ["response: value is missing"]
    (folder / "notes.jsonl").write_text("{}\n")
    with pytest.raises(SourceError, match="'notes.jsonl' is not named by a split"):
        load_examples(folder)


def test_a_split_column_of_the_source_is_respected_and_an_unknown_split_is_quarantined(tmp_path):
    rows = [{"prompt": "Where is A1?", "response": "Shipped.", "split": "TEST"},
            {"prompt": "Where is A2?", "response": "Shipped.", "split": "train"},
            {"prompt": "Where is A3?", "response": "Shipped.", "split": "holdout"}]
    report = validate_examples(load_examples(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert list(report.accepted["split"]) == ["eval", "train"]
    assert reasons_by_row(report)[3] == ["split: 'holdout' is not one of 'train', 'eval'"]


def test_a_format_that_cannot_apply_names_the_setting():
    frame = pd.DataFrame({"prompt": ["a"], "response": ["b"], "_row_number": [1]})
    with pytest.raises(FormatError, match="raw_examples.format is chat but the source has no 'messages'"):
        to_examples(frame, "chat", ColumnMapping())
    with pytest.raises(FormatError, match="raw_examples.format 'xml' is not one of"):
        to_examples(frame, "xml", ColumnMapping())
    with pytest.raises(FormatError, match="columns.prompt maps 'question'"):
        to_examples(frame.assign(question=["q"]), "columns", ColumnMapping(prompt="question"))


def test_the_column_mapping_is_typed_config_of_raw_examples_with_descriptions(resources, instance,
                                                                              tmp_path):
    from assets.dataset import RawExamplesConfig, raw_examples, validated_dataset

    fields = RawExamplesConfig.model_json_schema()
    assert "format" in fields["properties"] and "columns" in fields["properties"]
    columns_schema = RawExamplesConfig.__fields__["columns"].annotation.model_json_schema()
    assert "eval report breaks metrics down by" in columns_schema["properties"]["slice"]["description"]
    from llmops_dagster.dataset.synthetic_data import generate_examples

    source = tmp_path / "tickets.jsonl"
    write_jsonl(source, [{"question": r["prompt"], "answer": r["response"], "category": r["intent"]}
                         for r in generate_examples(n_rows=120, seed=3)])
    result = dg.materialize(
        [raw_examples, validated_dataset], resources=resources, instance=instance,
        run_config={"ops": {"raw_examples": {"config": {
            "source": str(source),
            "columns": {"prompt": "question", "response": "answer", "slice": "category"}}}}})
    assert result.success
    [check] = [c for c in result.get_asset_check_evaluations()
               if c.check_name == "quarantine_within_threshold"]
    assert check.passed
    [event] = result.asset_materializations_for_node("validated_dataset")
    assert event.metadata["rows_accepted"].value + event.metadata["rows_quarantined"].value == 120
    assert event.metadata["rows_accepted"].value >= 110
