"""The page at GET /: ask a question, read the answer, rate it (up/down, optional correction), and,
with a reviewer key, accept or reject the corrections waiting for review.

Plain HTML and JavaScript with no outside resources. Every text that came from the API (answers,
prompts, corrections, error details) goes into the page through textContent, never as HTML: a
correction is whatever a stranger typed. The answer's feedback token lives only in a variable
(one answer's credential, gone with the page); the reviewer key only in sessionStorage (gone with
the tab, never in localStorage or a URL); the client id in localStorage is a label, not a secret.
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>Aurora support assistant</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  textarea { width: 100%; min-height: 4rem; font: inherit; box-sizing: border-box; }
  input { font: inherit; }
  #answer { white-space: pre-wrap; background: #f4f4f6; padding: .8rem; min-height: 2rem; }
  .meta { color: #666; font-size: .85rem; }
  button { font: inherit; padding: .3rem .9rem; margin: .3rem .3rem .3rem 0; }
  #reviewer { margin-top: 2.5rem; border-top: 1px solid #ccc; padding-top: .5rem; }
  #reviewer summary { font-size: 1.25rem; font-weight: bold; cursor: pointer; }
  #reviewer-key { width: 15rem; max-width: 100%; }
  #review-status { font-weight: 600; }
  #reviews { list-style: none; padding: 0; }
  #reviews li { border: 1px solid #ccc; border-radius: 4px; padding: .6rem .8rem; margin: .8rem 0; }
  #reviews li.accepted { border-color: #2a7a2a; background: #f1f9f1; }
  #reviews li.rejected { border-color: #a33; background: #fbf1f1; }
  #reviews dl { margin: .3rem 0; }
  #reviews dt { font-weight: 600; font-size: .85rem; margin-top: .4rem; }
  #reviews dd { margin: .1rem 0 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
  #reviews dd.answer { background: #f4f4f6; padding: .3rem .5rem; }
  #reviews dd.correction { background: #eef4fb; padding: .3rem .5rem; }
  #reviews .note { width: 14rem; max-width: 100%; }
  #reviews .state { font-weight: 600; }
</style>
</head>
<body>
<h1>Aurora support assistant</h1>
<label for="prompt">Your question</label>
<textarea id="prompt" maxlength="2000" placeholder="Where is my order A12345?"></textarea>
<button id="ask">Ask</button>
<h2>Answer</h2>
<div id="answer" aria-live="polite"></div>
<p class="meta">response <span id="response-id">-</span> · model <span id="model-version">-</span>
 · <span id="latency">-</span> ms</p>
<div id="rate" hidden>
  <button id="up" title="Good answer">👍</button>
  <button id="down" title="Bad answer">👎</button>
  <label for="correction">A better answer (optional; with 👎 it goes to a reviewer)</label>
  <textarea id="correction" maxlength="4000"></textarea>
  <button id="send-feedback">Send feedback</button>
</div>
<p id="status" class="meta" role="status"></p>

<details id="reviewer">
<summary>Review corrections</summary>
<p class="meta">For reviewers: accepted corrections become training examples. Your key stays in
this tab only (sessionStorage) and is sent only as an Authorization header.</p>
<label for="reviewer-key">Reviewer key</label>
<input id="reviewer-key" type="password" autocomplete="off" spellcheck="false" placeholder="llk_...">
<button id="load-reviews">Load corrections</button>
<button id="forget-key" title="Remove the key from this tab">Forget key</button>
<p id="review-status" role="status"></p>
<ol id="reviews"></ol>
</details>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const REVIEWER_KEY = "llmops-reviewer-key";  // sessionStorage: this tab only
const clientId = localStorage.getItem("llmops-client") || crypto.randomUUID();
localStorage.setItem("llmops-client", clientId);
let answer = null;  // {response_id, feedback_token} of the answer on screen, in memory only
let rating = 0;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function detailText(data) {
  const detail = data !== null && typeof data === "object" && "detail" in data ? data.detail : data;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {  // 422: one entry a bad field
    return detail.map((e) => (e.loc || []).join(".") + ": " + e.msg).join("; ");
  }
  return JSON.stringify(detail);
}

async function call(method, path, body, key) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, {method, headers, cache: "no-store",
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  const retry = response.headers.get("Retry-After");
  if (response.status === 429) throw new ApiError(429, "rate limited: retry in " + (retry || "?") + " s");
  if (response.status === 503 && retry) throw new ApiError(503, "server busy: retry in " + retry + " s");
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch (_) { /* not JSON: show the text */ }
  if (!response.ok) throw new ApiError(response.status, "error " + response.status + ": " + detailText(data));
  return data;
}

const problem = (error) => error instanceof ApiError ? error.message : "error: " + error.message;

$("ask").onclick = async () => {
  $("status").textContent = "asking...";
  try {
    const data = await call("POST", "/v1/generate", {prompt: $("prompt").value});
    answer = {response_id: data.response_id, feedback_token: data.feedback_token};
    rating = 0;
    $("correction").value = "";
    $("answer").textContent = data.text;
    $("response-id").textContent = data.response_id;
    $("model-version").textContent = data.model_version;
    $("latency").textContent = data.latency_ms.toFixed(0);
    $("rate").hidden = false;
    $("status").textContent = "";
  } catch (error) { $("status").textContent = problem(error); }
};
$("up").onclick = () => { rating = 1; $("status").textContent = "rated 👍"; };
$("down").onclick = () => { rating = -1; $("status").textContent = "rated 👎"; };

function feedbackText(data, sentCorrection) {
  let text = "feedback " + data.status;
  if (data.status !== "counted") text += ": " + data.reason.replace(/^duplicate: /, "");
  if (sentCorrection) {
    text += data.review === "pending" ? "; correction pending review"
          : data.review ? "; correction " + data.review
          : "; correction not reviewed (only a 👎 correction is)";
  }
  return text;
}

$("send-feedback").onclick = async () => {
  if (!answer) { $("status").textContent = "ask a question first"; return; }
  if (!rating) { $("status").textContent = "choose 👍 or 👎 first"; return; }
  const correction = $("correction").value.trim();
  $("send-feedback").disabled = true;
  try {
    const data = await call("POST", "/v1/feedback", {
      response_id: answer.response_id, rating, correction: correction || null,
      feedback_token: answer.feedback_token, client_id: clientId});
    $("status").textContent = feedbackText(data, Boolean(correction));
  } catch (error) { $("status").textContent = problem(error); }
  finally { $("send-feedback").disabled = false; }
};

$("reviewer-key").value = sessionStorage.getItem(REVIEWER_KEY) || "";

function field(list, label, text, className) {
  const term = document.createElement("dt");
  term.textContent = label;
  const value = document.createElement("dd");
  value.className = className;
  value.textContent = text;
  list.append(term, value);
}

function decisionButton(label, className, item) {
  const button = document.createElement("button");
  button.textContent = label;
  button.className = className;
  button.dataset.feedbackId = item.feedback_id;
  return button;
}

function showReviews(items) {
  const list = $("reviews");
  list.replaceChildren();
  for (const item of items) {
    const entry = document.createElement("li");
    entry.className = "review pending";
    entry.dataset.feedbackId = item.feedback_id;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "feedback " + item.feedback_id + " · model " + item.model_version + " · from "
      + item.rater + (item.counted ? "" : " (rating not counted)") + " · " + item.created_at;
    const fields = document.createElement("dl");
    field(fields, "Question", item.prompt, "prompt");
    field(fields, "Model answer", item.answer, "answer");
    field(fields, "Correction", item.correction, "correction");
    if (item.comment) field(fields, "Comment", item.comment, "comment");
    const note = document.createElement("input");
    note.className = "note";
    note.maxLength = 4000;
    note.placeholder = "note (optional)";
    note.setAttribute("aria-label", "note on feedback " + item.feedback_id);
    const accept = decisionButton("Accept", "accept", item);
    const reject = decisionButton("Reject", "reject", item);
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = "pending";
    accept.onclick = () => decide(entry, "accept");
    reject.onclick = () => decide(entry, "reject");
    entry.append(meta, fields, note, accept, reject, state);
    list.append(entry);
  }
}

async function decide(entry, decision) {
  const controls = entry.querySelectorAll("button, input");
  const state = entry.querySelector(".state");
  const id = entry.dataset.feedbackId;
  controls.forEach((control) => { control.disabled = true; });
  state.textContent = decision === "accept" ? "accepting..." : "rejecting...";
  try {
    const data = await call("POST", "/v1/reviews/" + encodeURIComponent(id),
                            {decision, note: entry.querySelector(".note").value.trim()},
                            sessionStorage.getItem(REVIEWER_KEY));
    state.textContent = data.review + " by " + data.reviewed_by;
    entry.classList.replace("pending", data.review);
    $("review-status").textContent = "feedback " + id + " " + data.review;
  } catch (error) {
    state.textContent = problem(error);
    $("review-status").textContent = problem(error);
    if (error.status !== 409) controls.forEach((control) => { control.disabled = false; });
  }
}

$("load-reviews").onclick = async () => {
  const key = $("reviewer-key").value.trim();
  if (!key) { $("review-status").textContent = "paste a reviewer key first"; return; }
  sessionStorage.setItem(REVIEWER_KEY, key);
  $("review-status").textContent = "loading...";
  try {
    const data = await call("GET", "/v1/reviews?limit=50", undefined, key);
    showReviews(data.pending);
    $("review-status").textContent = data.pending.length
      ? data.pending.length + " correction(s) waiting for review" : "no corrections waiting for review";
  } catch (error) {
    if (error.status === 401) sessionStorage.removeItem(REVIEWER_KEY);  // unknown or revoked
    $("reviews").replaceChildren();
    $("review-status").textContent = problem(error);
  }
};

$("forget-key").onclick = () => {
  sessionStorage.removeItem(REVIEWER_KEY);
  $("reviewer-key").value = "";
  $("reviews").replaceChildren();
  $("review-status").textContent = "key forgotten";
};
</script>
</body>
</html>
"""


def _script_hash(html: str) -> str:
    import base64
    import hashlib

    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    return base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()


# The page loads nothing from elsewhere: only its own inline script (by hash) and style may run,
# and it may talk to this origin only. A second line of defence behind textContent.
PAGE_CSP = (f"default-src 'none'; script-src 'sha256-{_script_hash(PAGE_HTML)}'; "
            "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
