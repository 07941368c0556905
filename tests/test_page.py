"""The page at GET / in a real headless Chromium (Playwright): ask, read the answer, rate it down with a
correction, and find that rating in PostgreSQL.

Touches: the session's served model on 127.0.0.1 through the page, the session's PostgreSQL (adds one
request_log row and one feedback row, then reads them), and a screenshot under pytest's tmp_path.
Chromium is Debian's /usr/bin/chromium (`make browser` installs it); Playwright's download is not used.
"""

import sqlalchemy as sa
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Where is my order A12345?"
CORRECTION = "Order A12345 left the warehouse today — tracking 1Z999 ✅"


def test_page_asks_answers_and_records_a_correction(served_model, tmp_path):
    url, engine = served_model["url"], served_model["engine"]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/", wait_until="domcontentloaded", timeout=30_000)
            expect(page).to_have_title("Aurora support assistant")

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
            expect(page.locator("#status")).to_have_text("feedback recorded", timeout=30_000)

            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert screenshot.stat().st_size > 0 and screenshot.read_bytes().startswith(b"\x89PNG")

    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT r.prompt, r.response, r.model_version, f.rating, f.correction, f.client_id "
            "FROM feedback f JOIN request_log r USING (response_id) WHERE f.response_id = :id"),
            {"id": response_id}).one()
    assert (row.prompt, row.response, row.model_version) == (QUESTION, answer, served_model["version"])
    assert (row.rating, row.correction) == (-1, CORRECTION)
    assert row.client_id  # the page's own client id from localStorage
