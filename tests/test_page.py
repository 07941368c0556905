"""The page at GET / in a real headless Chromium (Playwright): ask, read the answer, rate it down with a
correction, and find that rating in PostgreSQL; then, as a reviewer, accept a pending correction.

Touches: the session's served model on 127.0.0.1 through the page and over HTTP, the session's
PostgreSQL (adds API keys, request_log and feedback rows, a review decision and its audit row, then
reads them), screenshots under pytest's tmp_path, and test-artifacts/review-page.png (or under
$LLMOPS_TEST_ARTIFACTS), kept after the run for people to look at.
Chromium is Debian's /usr/bin/chromium (`make browser` installs it); Playwright's download is not used.
"""

import contextlib
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import sqlalchemy as sa
from playwright.sync_api import expect, sync_playwright

from llmops_dagster.serving import credentials

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Where is my order A12345?"
CORRECTION = "Order A12345 left the warehouse today — tracking 1Z999 ✅"
# Shown to a reviewer as text: markup in a prompt or correction must never run or render.
HOSTILE_QUESTION = 'Where is order B777? <img src=x onerror="window.pwned = 1">'
HOSTILE_CORRECTION = "<script>window.pwned = 1</script>Order B777 ships on Monday."


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("LLMOPS_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@contextlib.contextmanager
def page_at(url: str):
    """The page at `url`/ in headless Chromium, and the list its uncaught script errors go to."""
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = page.goto(url + "/", wait_until="domcontentloaded", timeout=30_000)
            # The page runs under a policy that allows its own inline script only (by hash).
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            expect(page).to_have_title("Aurora support assistant")
            yield page, errors
        finally:
            browser.close()


def test_page_asks_answers_and_records_a_correction(served_model, tmp_path):
    url, engine = served_model["url"], served_model["engine"]
    with page_at(url) as (page, errors):
        page.locator("#prompt").fill(QUESTION)
        page.locator("#ask").click()
        page.wait_for_function(
            """() => document.getElementById("status").textContent.startsWith("error")
               || (document.getElementById("answer").textContent.trim() !== ""
                   && document.getElementById("response-id").textContent !== "-")""",
            timeout=60_000)
        assert not page.locator("#status").text_content().startswith("error"), page.content()
        response_id = page.locator("#response-id").text_content()
        answer = page.locator("#answer").text_content()
        expect(page.locator("#model-version")).to_have_text(served_model["version"])

        page.locator("#down").click()
        expect(page.locator("#status")).to_have_text("rated 👎")
        page.locator("#correction").fill(CORRECTION)
        page.locator("#send-feedback").click()
        expect(page.locator("#status")).to_have_text("feedback counted; correction pending review",
                                                     timeout=30_000)

        screenshot = tmp_path / "page.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert not errors
    assert screenshot.stat().st_size > 0 and screenshot.read_bytes().startswith(b"\x89PNG")

    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT r.prompt, r.response, r.model_version, f.rating, f.correction, f.client_id, "
            "f.counted, f.credential, f.review_state "
            "FROM feedback f JOIN request_log r USING (response_id) WHERE f.response_id = :id"),
            {"id": response_id}).one()
    assert (row.prompt, row.response, row.model_version) == (QUESTION, answer, served_model["version"])
    assert (row.rating, row.correction) == (-1, CORRECTION)
    assert row.client_id  # the page's own client id from localStorage
    # The page sent the answer's feedback token: the rating counts, its correction awaits a reviewer.
    assert (row.counted, row.credential, row.review_state) == (True, "feedback_token", "pending")


def test_reviewer_accepts_a_correction_on_the_page(served_model, tmp_path):
    url, engine = served_model["url"], served_model["engine"]
    _, reviewer_key = credentials.create_key(engine, "alice", "reviewer", created_by="test_page")
    _, client_key = credentials.create_key(engine, "carol", "client", created_by="test_page")
    status, answer = post(f"{url}/v1/generate", {"prompt": HOSTILE_QUESTION})
    assert status == 200, answer
    status, stored = post(f"{url}/v1/feedback", {
        "response_id": answer["response_id"], "rating": -1, "correction": HOSTILE_CORRECTION,
        "feedback_token": answer["feedback_token"]})
    assert status == 200 and (stored["status"], stored["review"]) == ("counted", "pending"), stored
    feedback_id = stored["feedback_id"]

    with page_at(url) as (page, errors):
        page.locator("#reviewer summary").click()
        review_status = page.locator("#review-status")

        page.locator("#reviewer-key").fill("llk_not-a-key-anyone-was-given")
        page.locator("#load-reviews").click()
        expect(review_status).to_have_text("error 401: the API key is unknown or revoked", timeout=30_000)

        page.locator("#reviewer-key").fill(client_key)
        page.locator("#load-reviews").click()
        expect(review_status).to_have_text(
            "error 403: key carol has role client; reviews need the reviewer role", timeout=30_000)
        expect(page.locator("#reviews li")).to_have_count(0)
        page.screenshot(path=str(tmp_path / "review-forbidden.png"), full_page=True)

        page.locator("#reviewer-key").fill(reviewer_key)
        page.locator("#load-reviews").click()
        entry = page.locator(f'#reviews li[data-feedback-id="{feedback_id}"]')
        expect(entry).to_have_count(1, timeout=30_000)
        expect(entry.locator("dd.prompt")).to_have_text(HOSTILE_QUESTION)
        expect(entry.locator("dd.answer")).to_have_text(answer["text"])
        expect(entry.locator("dd.correction")).to_have_text(HOSTILE_CORRECTION)
        assert page.locator("#reviews img, #reviews script").count() == 0
        assert page.evaluate("window.pwned") is None

        entry.locator(f'button.accept[data-feedback-id="{feedback_id}"]').click()
        expect(entry.locator(".state")).to_have_text("accepted by key:alice", timeout=30_000)
        expect(entry.locator("button.reject")).to_be_disabled()

        screenshot = tmp_path / "review-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        # The key stays in this tab's sessionStorage: not in localStorage, not in the URL.
        assert page.evaluate("sessionStorage.getItem('llmops-reviewer-key')") == reviewer_key
        assert reviewer_key not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
        assert reviewer_key not in page.url
    assert not errors
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    shutil.copyfile(screenshot, artifacts_dir() / "review-page.png")

    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT review_state, reviewed_by, reviewed_at FROM feedback WHERE id = :id"),
            {"id": feedback_id}).one()
        audit = connection.execute(sa.text(
            "SELECT action, actor FROM feedback_audit_log WHERE feedback_id = :id ORDER BY id"),
            {"id": feedback_id}).all()
    assert (row.review_state, row.reviewed_by) == ("accepted", "key:alice") and row.reviewed_at
    assert [tuple(a) for a in audit] == [("accepted", "key:alice")]
