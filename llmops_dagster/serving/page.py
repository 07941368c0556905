"""The page at GET /: ask a question, read the answer, rate it (up/down, optional correction)."""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Aurora support assistant</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  textarea { width: 100%; min-height: 4rem; font: inherit; }
  #answer { white-space: pre-wrap; background: #f4f4f6; padding: .8rem; min-height: 2rem; }
  .meta { color: #666; font-size: .85rem; }
  button { font: inherit; padding: .3rem .9rem; margin: .3rem .3rem .3rem 0; }
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
  <label for="correction">A better answer (optional)</label>
  <textarea id="correction" maxlength="4000"></textarea>
  <button id="send-feedback">Send feedback</button>
</div>
<p id="status" class="meta" role="status"></p>
<script>
let rating = 0;
const $ = (id) => document.getElementById(id);
const clientId = localStorage.getItem("llmops-client") || crypto.randomUUID();
localStorage.setItem("llmops-client", clientId);
async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(JSON.stringify(data.detail ?? data));
  return data;
}
$("ask").onclick = async () => {
  $("status").textContent = "asking...";
  try {
    const data = await post("/v1/generate", {prompt: $("prompt").value});
    $("answer").textContent = data.text;
    $("response-id").textContent = data.response_id;
    $("model-version").textContent = data.model_version;
    $("latency").textContent = data.latency_ms.toFixed(0);
    $("rate").hidden = false;
    $("status").textContent = "";
  } catch (error) { $("status").textContent = "error: " + error.message; }
};
$("up").onclick = () => { rating = 1; $("status").textContent = "rated 👍"; };
$("down").onclick = () => { rating = -1; $("status").textContent = "rated 👎"; };
$("send-feedback").onclick = async () => {
  if (!rating) { $("status").textContent = "choose 👍 or 👎 first"; return; }
  const correction = $("correction").value.trim();
  try {
    const data = await post("/v1/feedback", {response_id: $("response-id").textContent, rating,
                                             correction: correction || null, client_id: clientId});
    $("status").textContent = "feedback " + data.status;
  } catch (error) { $("status").textContent = "error: " + error.message; }
};
</script>
</body>
</html>
"""
