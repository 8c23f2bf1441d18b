"""The page ``textgen serve`` shows at ``/``: a form that streams from ``POST /v1/generate``
(Server-Sent Events read with ``fetch``, since ``EventSource`` cannot POST). One HTML document,
no external scripts or styles. ``add_page_route(app)`` registers it.

The page marks its state for tests and scripts: ``#out`` holds the text so far and gets
``data-done="1"`` when the stream ends (``data-error`` with the message on a failure),
``data-first-ms`` the milliseconds from the click to the first character; ``<body data-ready-ms>``
the milliseconds from navigation to a usable form.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>textgen</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 label { display: inline-block; margin: .25rem 1rem .25rem 0; }
 input[type=number] { width: 6rem; } textarea { width: 100%; font: inherit; }
 #out { white-space: pre-wrap; background: #f6f6f2; border: 1px solid #ddd; padding: 1rem; min-height: 8rem; }
 #out b { font-weight: 600; color: #555; } small { color: #777; }
</style></head>
<body>
<h1>textgen</h1>
<form id="form">
 <textarea id="prompt" rows="2" placeholder="prompt">alice was </textarea><br>
 <label>temperature <input id="temperature" type="number" step="0.05" min="0" value="0.8"></label>
 <label>top-p <input id="top_p" type="number" step="0.01" min="0" max="1" value="0.95"></label>
 <label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
 <label>stop <input id="stop" type="text" placeholder="e.g. ." size="6"></label>
 <label>characters <input id="max_chars" type="number" min="1" value="300"></label>
 <button id="go" type="submit">Generate</button>
</form>
<p><small id="status">Streams from POST /v1/generate.</small></p>
<div id="out"></div>
<script type="module">
const $ = (id) => document.getElementById(id);

function request() {
  const body = { prompt: $('prompt').value, temperature: Number($('temperature').value),
    top_p: Number($('top_p').value), max_chars: Number($('max_chars').value), stream: true };
  if ($('seed').value !== '') body.seed = Number($('seed').value);
  if ($('stop').value !== '') body.stop = [$('stop').value];
  return body;
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\\r\\n/g, '\\n');
    let cut;
    while ((cut = buffer.indexOf('\\n\\n')) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = (block.match(/^event: ?(.*)$/m) || [, 'message'])[1];
      const data = block.split('\\n').filter((l) => l.startsWith('data:')).map((l) => l.replace(/^data: ?/, '')).join('\\n');
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function generate(e) {
  e.preventDefault();
  const out = $('out'), started = performance.now();
  out.textContent = ''; delete out.dataset.done; delete out.dataset.error; delete out.dataset.firstMs;
  const response = await fetch('/v1/generate', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(request()) });
  if (!response.ok) { out.dataset.error = (await response.json()).error; out.textContent = out.dataset.error; return; }
  $('status').textContent = 'seed ' + response.headers.get('X-Textgen-Seed');
  for await (const { event, data } of events(response)) {
    if (event === 'delta' && data.index === 0) {
      if (!out.dataset.firstMs) out.dataset.firstMs = performance.now() - started;
      out.textContent += data.text;
    }
    if (event === 'error') out.dataset.error = data.error;
  }
  $('status').textContent += ' · ' + Math.round(performance.now() - started) + ' ms';
  out.dataset.done = '1';
}
$('form').addEventListener('submit', generate);
document.body.dataset.readyMs = performance.now();
</script>
</body></html>
"""


def add_page_route(app) -> None:
    """``GET /``: the page (HTML; not in the OpenAPI schema)."""
    from fastapi.responses import HTMLResponse

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)
