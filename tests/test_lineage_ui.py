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
    assert f"trace page written to {page}" in capsys.readouterr().out
    html = page.read_text()
    model = registry.get(served["engine"], served["version"])
    for asset, version in [("validated_dataset", model.dataset_version), ("prompt_set",
                           model.prompt_set_version), ("finetuned_checkpoint", model.version)]:
        assert f'href="http://ui.example:3000/assets/{asset}?view=events&amp;time=' in html, asset
        assert version in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    (artifacts_dir() / "trace.html").write_text(html)
