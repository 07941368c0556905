"""An analyst in the Dagster UI clicks from the served model to the exact validated_dataset
materialization that fed it, in a real dagster-webserver driven by headless Chromium.

Touches: a copy of the session's template Dagster instance (a folder of this test's own, used as
DAGSTER_HOME), a copy of the template database, the session's Ray Serve (one redeploy), a
dagster-webserver on a free 127.0.0.1 port, and screenshots under test-artifacts/ (or
$LLMOPS_TEST_ARTIFACTS), kept after the run. A newer validated_dataset materialization is made
first, so the link must lead to the older one that actually fed the model, not to the latest.
"""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
from playwright.sync_api import sync_playwright

from assets.dataset import validated_dataset
from llmops_dagster.governance import registry
from llmops_dagster.training.launch import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("LLMOPS_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_webserver(dagster_home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read().decode()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise AssertionError("dagster-webserver did not answer within 180 s")


def dismiss_welcome_dialog(page) -> None:
    """A new instance's UI first asks to join its community; a new analyst skips it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5_000)
    except Exception:  # no dialog this time
        return
    skip.click()
    skip.wait_for(state="hidden", timeout=10_000)


def test_an_analyst_clicks_from_the_served_model_to_the_dataset_that_fed_it(served_model_with_runs):
    served = served_model_with_runs
    model = registry.get(served["engine"], served["version"])
    instance = served["instance"]
    # A newer dataset version (another eval split) materialized after the model was trained.
    newer = dg.materialize([validated_dataset], resources=served["resources"], instance=instance,
                           run_config={"ops": {"validated_dataset": {"config": {"eval_fraction": 0.2}}}})
    [newer_event] = newer.asset_materializations_for_node("validated_dataset")
    newer_version = newer_event.metadata["version"].value
    assert newer_version != model.dataset_version

    [deployed] = served["result"].asset_materializations_for_node("serving_deployment")
    link = deployed.metadata["upstream/validated_dataset"].value
    assert link.startswith("/assets/validated_dataset?view=events&time=")

    server, ui = start_webserver(served["dagster_home"])
    shots = artifacts_dir()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                 headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(f"{ui}/assets/serving_deployment?view=events", timeout=120_000)
                anchor = page.locator(f'a[href="{link}"]').first
                anchor.wait_for(timeout=120_000)
                dismiss_welcome_dialog(page)
                page.screenshot(path=str(shots / "lineage-1-serving_deployment.png"), full_page=True)
                with page.context.expect_page(timeout=10_000) as opened:
                    anchor.click()
                target = opened.value
                target.wait_for_load_state()
                target.get_by_text(model.dataset_version).first.wait_for(timeout=120_000)
                target.screenshot(path=str(shots / "lineage-2-validated_dataset.png"), full_page=True)
                assert "/assets/validated_dataset" in target.url and "time=" in target.url
                text = target.locator("body").inner_text()
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    # The event the link opens is the one that fed the served model, not the newest.
    assert model.dataset_version in text and newer_version not in text


def test_the_trace_of_an_answer_is_a_page_linked_to_the_ui(served_model_with_runs, dagster_database,
                                                           monkeypatch, tmp_path, capsys):
    """`llmops trace ID --html FILE`: what the terminal shows, as a page whose products link to the
    exact materializations; whatever a person sent is escaped, never markup."""
    import json

    from llmops_dagster import cli

    served = served_model_with_runs
    prompt = "Where is my order A12345? <script>alert(1)</script>"
    request = urllib.request.Request(f"{served['url']}/v1/generate", data=json.dumps(
        {"prompt": prompt}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response_id = json.loads(response.read())["response_id"]
    monkeypatch.setenv("DAGSTER_HOME", str(served["dagster_home"]))
    page = tmp_path / "trace.html"
    assert cli.main(["trace", response_id, "--html", str(page), "--ui-url", "http://ui.example:3000"]) == 0
    out, err = capsys.readouterr()
    assert f"trace page written to {page}" in out
    assert "warning: no Dagster UI answers at http://ui.example:3000" in err  # nothing serves there
    html = page.read_text()
    model = registry.get(served["engine"], served["version"])
    for asset, version in [("validated_dataset", model.dataset_version), ("prompt_set",
                           model.prompt_set_version), ("finetuned_checkpoint", model.version)]:
        assert f'href="http://ui.example:3000/assets/{asset}?view=events&amp;time=' in html, asset
        assert version in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    (artifacts_dir() / "trace.html").write_text(html)


def ask(url: str, prompt: str) -> str:
    """The response id of the served model's answer to `prompt`."""
    import json

    request = urllib.request.Request(f"{url}/v1/generate", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["response_id"]


def test_the_trace_links_to_the_running_ui_the_fine_tune_that_trained_and_the_nearest_rows(
        served_model_with_runs, dagster_database, llmops_home, monkeypatch, tmp_path, capsys):
    """`llmops trace ID --html FILE` with `llmops ui` serving on a port of its own: the page links
    there (no warning); the fine-tune link opens the materialization that trained the model, not a
    later one that reused it; the training rows shown are the ones nearest to the question, with
    their cosine distances."""
    from assets.dataset import dataset_embeddings
    from assets.training import finetuned_checkpoint
    from llmops_dagster import cli
    from llmops_dagster.dataset import dataset_store
    from llmops_dagster.infra import ui
    from llmops_dagster.infra.lineage import find_materialization
    from resources.artifacts import ArtifactStore

    served = served_model_with_runs
    instance, model = served["instance"], registry.get(served["engine"], served["version"])
    trained = find_materialization(instance, "finetuned_checkpoint", model.version)
    # Against the template's artifact root, where the fine-tune is complete: nothing is trained.
    template_artifacts = ArtifactStore(root=str(llmops_home / "served-artifacts"))
    reuse = dg.materialize([finetuned_checkpoint], instance=instance,
                           resources={**served["resources"], "artifacts": template_artifacts})
    [reused] = reuse.asset_materializations_for_node("finetuned_checkpoint")
    assert reused.metadata["reused"].value is True and reused.metadata["version"].value == model.version
    assert trained.asset_materialization.metadata["reused"].value is False
    assert dg.materialize([dataset_embeddings], resources=served["resources"], instance=instance).success

    with served["engine"].connect() as connection:
        dataset = dataset_store.recorded_dataset(connection, model.dataset_version)
    rows = dataset_store.read_accepted(dataset.path)
    question_row = rows[rows["split"] == "train"].iloc[7]  # a training prompt, asked word for word
    response_id = ask(served["url"], question_row["prompt"])

    server, url = start_webserver(served["dagster_home"])
    url_file = llmops_home / "ui" / ui.URL_FILE  # as `llmops ui` records where it serves
    try:
        url_file.parent.mkdir(mode=0o700, exist_ok=True)
        url_file.write_text(url + "\n")
        monkeypatch.setenv("DAGSTER_HOME", str(served["dagster_home"]))
        monkeypatch.delenv("LLMOPS_DAGSTER_UI_URL", raising=False)
        page = tmp_path / "trace.html"
        capsys.readouterr()  # the runs' logs above
        assert cli.main(["trace", response_id, "--html", str(page), "--rows", "4"]) == 0
        out, err = capsys.readouterr()
    finally:
        url_file.unlink(missing_ok=True)
        server.terminate()
        server.wait(timeout=60)
    assert err == "", err
    html = page.read_text()
    assert "http://127.0.0.1:3000" not in html
    assert (f'<a href="{url}/assets/finetuned_checkpoint?view=events&amp;time='
            f'{int(round(trained.timestamp * 1000))}">') in html
    assert f'href="{url}/runs/{trained.run_id}"' in html and reuse.run_id not in html

    shown = out.split("nearest to the question (cosine distance of the prompt embeddings):\n")[1]
    lines = [line for line in shown.splitlines() if line.startswith("  row ")][:4]
    assert len(lines) == 4, out
    distances = [float(line.split("distance ")[1].split()[0]) for line in lines]
    assert distances == sorted(distances) and distances[0] < 1e-3, out
    assert lines[0].split()[1] == str(int(question_row["_row_number"])) or distances[1] < 1e-3, out
    assert "<th>cosine distance</th>" in html and f"{distances[0]:.4f}" in html
