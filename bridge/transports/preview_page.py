"""The preview page: HTML, CSS and script in one self-contained document (the page is served
offline, so it loads nothing from anywhere else). `preview.py` serves it at `/`.

What the page does, all from same-origin requests to the preview server:
- shows `/stream.mjpg` fitted to its column (aspect kept, never taller than most of the window);
- polls `/status` twice a second: the status line, a plot of frame time and fps over the last
  minute, each input's and output's state, and the form, which follows the live values;
- sends a changed control as `POST /set` with a form-encoded body (`name`, `value`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.transports.base import SinkContext

# An int whose range is wider than this gets a number field: a slider cannot pick one value
# out of two billion (the seed).
SLIDER_MAX_SPAN = 10_000
MAX_IMAGE_HEIGHT_VH = 75  # the image is scaled to its column's width, but never taller than this


def label(row: Mapping[str, Any]) -> str:
    """What a person reads for a parameter: the table's label (the same words as OBS and
    TouchDesigner), else its name."""
    return str(row.get("label") or row["name"])


def _attr(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _control(row: Mapping[str, Any]) -> str:
    """The input element(s) of one parameter; the script reads `data-kind` to set and read them."""
    name, kind, default = row["name"], row["type"], row["default"]
    common = f'name="{_attr(name)}" data-kind="{_attr(kind)}"'
    if kind == "bool":
        checked = " checked" if default else ""
        return f'<input type="checkbox" {common}{checked}>'
    if kind in ("float", "int"):
        lo, hi = row["min"], row["max"]
        step = "1" if kind == "int" else "any"
        number = (
            f'<input type="number" {common} min="{lo}" max="{hi}" step="{step}" value="{_attr(default)}">'
        )
        if kind == "int" and hi - lo > SLIDER_MAX_SPAN:
            button = ""
            if name.endswith("seed"):
                button = (
                    f'<button type="button" class="random" data-for="{_attr(name)}">new random seed</button>'
                )
            return number + button
        slider_step = "1" if kind == "int" else f"{(hi - lo) / 200:g}"
        slider = f'<input type="range" {common} min="{lo}" max="{hi}" step="{slider_step}" value="{_attr(default)}">'
        return slider + number
    if kind == "int_list":
        value = " ".join(str(v) for v in default)
    elif kind == "blend":
        value = " | ".join(f"{t}:{w}" for t, w in default)
    else:
        value = str(default)
    return f'<input type="text" {common} value="{_attr(value)}" size="40" spellcheck="false">'


def _rows(params: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for row in params:
        if not row["live"]:
            continue
        name = row["name"]
        tip = f"{row['doc']} ({row.get('address') or '/sd/' + name})"
        rows.append(
            f'<tr><th scope="row" title="{_attr(tip)}">{html.escape(label(row))}</th>'
            f'<td data-param="{_attr(name)}">{_control(row)}</td></tr>'
        )
    return "\n".join(rows)


def page(ctx: SinkContext) -> str:
    """The whole page for the bridge behind `ctx`: one control per live parameter of its table."""
    width, height = max(int(ctx.width), 1), max(int(ctx.height), 1)
    values = {
        "ROWS": _rows(ctx.params),
        "VIEW_STYLE": f"max-width:calc({MAX_IMAGE_HEIGHT_VH}vh * {width} / {height})",
        "WIDTH": str(width),
        "HEIGHT": str(height),
        "SCRIPT": _SCRIPT,
    }
    # one pass, so a placeholder-like text inside a value (a prompt "{SCRIPT}") stays as it is
    return re.sub(r"\{([A-Z_]+)\}", lambda m: values[m[1]], _PAGE)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>StreamDiffusion Bridge</title>
<style>
:root{color-scheme:dark}
body{background:#111;color:#ddd;font:14px system-ui,sans-serif;margin:0;padding:12px}
h1{font-size:16px;font-weight:600;margin:0 0 10px}
main{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
#view{flex:3 1 420px;min-width:0}
#controls{flex:2 1 340px;min-width:0}
#out{display:block;width:100%;height:auto;background:#000}
#status{font-family:ui-monospace,monospace;margin:8px 0 4px;word-break:break-word}
.error{color:#f77;font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
#plot{display:block;width:100%;height:110px;margin:8px 0;background:#181818}
table{border-collapse:collapse}
#controls table{width:100%}
th,td{padding:3px 8px;text-align:left;vertical-align:middle}
#controls th{font-weight:500;white-space:nowrap}
#controls input[type=text]{width:100%;box-sizing:border-box}
#controls input[type=range]{width:55%;vertical-align:middle}
#controls input[type=number]{width:9em}
#io{width:100%;font-size:13px}
#io td,#io th{border-top:1px solid #2a2a2a}
.state-ok{color:#7d7}.state-wait{color:#fc6}.state-bad{color:#f77}.state-none{color:#999}
</style></head><body>
<h1>StreamDiffusion Bridge</h1>
<main>
<section id="view" style="{VIEW_STYLE}">
<img id="out" src="/stream.mjpg" width="{WIDTH}" height="{HEIGHT}" alt="the bridge's output">
<div id="status">connecting...</div>
<div id="error" class="error"></div>
<canvas id="plot" aria-label="frame time and fps over the last minute"></canvas>
<table id="io"><thead><tr><th>input / output</th><th>state</th><th>frames</th><th>error</th></tr></thead>
<tbody></tbody></table>
</section>
<section id="controls">
<form id="form"><table>
{ROWS}
</table></form>
<div id="form-error" class="error"></div>
</section>
</main>
<script>
{SCRIPT}
</script></body></html>
"""

_SCRIPT = r"""
'use strict';
const POLL_MS = 500;          // the form follows live values within about a second
const EDIT_GUARD_MS = 2000;   // a control edited this recently is not overwritten
const SENT_GUARD_MS = 5000;   // nor one whose sent value the bridge has not applied yet
const PLOT_WINDOW_MS = 60000;

const controls = new Map();   // parameter name -> its input elements
const edited = new Map();     // name -> performance.now() of the last local edit
const sent = new Map();       // name -> {text, at}: sent, not yet seen in /status
const samples = [];           // {t, fps, ms} for the plot
const failures = new Map();   // input name -> its failure count at the previous poll

function isNum(x) { return typeof x === 'number' && Number.isFinite(x); }
function fmt(x, digits) { return isNum(x) ? x.toFixed(digits) : '–'; }
function fmtFps(x) { return isNum(x) ? x.toFixed(x < 10 ? 2 : 1) : '–'; }

// A live value as the text its control shows.
function asText(kind, v) {
  if (v === undefined || v === null) return null;
  if (kind === 'bool') return v ? 'true' : 'false';
  if (kind === 'float') return isNum(v) ? String(+v.toPrecision(6)) : String(v);
  if (kind === 'int_list') return Array.isArray(v) ? v.join(' ') : String(v);
  if (kind === 'blend') return Array.isArray(v) ? v.map(p => `${p[0]}:${+(+p[1]).toPrecision(6)}`).join(' | ') : String(v);
  return String(v);
}

// Typing goes into text and number fields, so focus guards them; a slider or a checkbox keeps
// the focus after a click and must still follow the bridge, so only a recent edit guards those.
function busy(name, now) {
  const typing = controls.get(name).some(el => el === document.activeElement && (el.type === 'text' || el.type === 'number'));
  if (typing) return true;
  if (now - (edited.get(name) || -Infinity) < EDIT_GUARD_MS) return true;
  const s = sent.get(name);
  return s !== undefined && now - s.at < SENT_GUARD_MS;
}

function follow(params) {
  if (!params || typeof params !== 'object') return;
  const now = performance.now();
  for (const [name, els] of controls) {
    const text = asText(els[0].dataset.kind, params[name]);
    if (text === null) continue;
    const s = sent.get(name);
    if (s !== undefined && s.text === text) sent.delete(name);
    if (busy(name, now)) continue;
    for (const el of els) {
      if (el.type === 'checkbox') { if (el.checked !== (text === 'true')) el.checked = text === 'true'; }
      else if (el.value !== text) el.value = text;
    }
  }
}

async function send(name, value) {
  const text = String(value);
  const kind = controls.get(name)[0].dataset.kind;
  const number = Number(text);
  const expect = (kind === 'float' || kind === 'int') && text.trim() !== '' && Number.isFinite(number) ? asText(kind, number) : text;
  sent.set(name, {text: expect, at: performance.now()});
  const out = document.getElementById('form-error');
  try {
    const r = await fetch('/set', {
      method: 'POST',
      headers: {'Content-Type': 'application/x-www-form-urlencoded'},
      body: new URLSearchParams({name: name, value: text}).toString(),
    });
    const body = await r.text();
    let reply = {};
    try { reply = JSON.parse(body); } catch (e) { reply = {error: body.slice(0, 200)}; }
    if (!r.ok || reply.ok === false) {
      sent.delete(name);
      out.textContent = reply.error || `the bridge refused ${name} (HTTP ${r.status})`;
    } else {
      out.textContent = '';
    }
  } catch (e) {
    sent.delete(name);
    out.textContent = `could not send ${name}: the bridge is not reachable`;
  }
}

function wire() {
  for (const cell of document.querySelectorAll('[data-param]')) {
    const name = cell.dataset.param;
    const els = Array.from(cell.querySelectorAll('input'));
    controls.set(name, els);
    for (const el of els) {
      const mark = () => edited.set(name, performance.now());
      el.addEventListener('input', () => {
        mark();
        for (const other of els) if (other !== el && other.type !== 'checkbox') other.value = el.value;
      });
      el.addEventListener('change', () => { mark(); send(name, el.type === 'checkbox' ? el.checked : el.value); });
      if (el.type === 'text' || el.type === 'number') {
        el.addEventListener('keydown', ev => { if (ev.key === 'Enter') { ev.preventDefault(); el.blur(); } });
      }
    }
  }
  for (const button of document.querySelectorAll('button.random')) {
    button.addEventListener('click', () => {
      const name = button.dataset.for;
      const field = controls.get(name)[0];
      const lo = Number(field.min) || 0, hi = Number(field.max) || 2147483647;
      const seed = lo + (crypto.getRandomValues(new Uint32Array(1))[0] % (hi - lo + 1));
      field.value = String(seed);
      edited.set(name, performance.now());
      send(name, seed);
    });
  }
}

// ---------------------------------------------------------------- the status line
const SHOWN = new Set(['state', 'mode', 'fps', 'latency_ms', 'engine_ms', 'skip_rate', 'dropped', 'frames', 'error']);

function statusLine(s) {
  const parts = [
    `${s.state ?? '–'} ${s.mode ?? ''}`.trim(),
    `${fmtFps(s.fps)} fps`,
    `latency ${fmt(s.latency_ms, 1)} ms`,
    `engine ${fmt(s.engine_ms, 1)} ms`,
    `skip ${isNum(s.skip_rate) ? (100 * s.skip_rate).toFixed(0) : '–'}%`,
    `dropped ${s.dropped ?? '–'}`,
    `frames ${s.frames ?? '–'}`,
  ];
  // fields this page does not know yet are shown as they come
  for (const [key, value] of Object.entries(s)) {
    if (SHOWN.has(key) || value === null || typeof value === 'object') continue;
    parts.push(`${key} ${isNum(value) && !Number.isInteger(value) ? +value.toPrecision(4) : value}`);
  }
  return parts.join(' | ');
}

// ---------------------------------------------------------------- inputs and outputs
function entries(x, fallback) {
  if (Array.isArray(x)) return x.map((v, i) => [String(v?.label ?? v?.name ?? `${fallback}${i}`), v]);
  if (x && typeof x === 'object') return Object.entries(x);
  return [];
}

function stateClass(state) {
  if (['open', 'running', 'ok', 'live'].includes(state)) return 'state-ok';
  if (['failed', 'failing', 'error', 'closed'].includes(state)) return 'state-bad';
  return state ? 'state-wait' : 'state-none';
}

function ioRows(s) {
  const rows = [];
  const inputs = s.inputs !== undefined ? entries(s.inputs, 'input ') : (s.input ? [['input', s.input]] : []);
  for (const [name, i] of inputs) {
    if (!i || typeof i !== 'object') continue;
    // no state field (yet): failing when its failure count grew since the last poll
    const grew = isNum(i.failures) && i.failures > (failures.get(name) ?? i.failures);
    if (isNum(i.failures)) failures.set(name, i.failures);
    const state = i.state ?? (grew ? 'failing' : i.waiting ? 'waiting' : 'open');
    rows.push([`input ${name === 'input' ? '' : name}`.trim(), state, i.frames, i.error ?? i.waiting ?? '', i.last_error]);
  }
  for (const [name, o] of entries(s.outputs, 'output ')) {
    if (!o || typeof o !== 'object') continue;
    rows.push([`output ${name}`, o.state, o.written ?? o.frames, o.error ?? '', o.last_error]);
  }
  if (s.midi && typeof s.midi === 'object') {
    rows.push([`midi ${s.midi.port || ''}`.trim(), s.midi.state ?? (s.midi.error ? 'error' : 'open'), undefined, s.midi.error ?? '', '']);
  }
  return rows;
}

function renderIo(s) {
  const body = document.querySelector('#io tbody');
  body.replaceChildren();
  for (const [name, state, frames, error, lastError] of ioRows(s)) {
    const tr = document.createElement('tr');
    const cells = [name, state ?? '–', frames ?? '', ''];
    for (const text of cells) { const td = document.createElement('td'); td.textContent = String(text); tr.appendChild(td); }
    tr.children[1].className = stateClass(state);
    const problem = error || (state !== 'open' && lastError) || '';
    const td = tr.children[3];
    if (problem) { td.textContent = problem; td.className = 'state-bad'; }
    else if (lastError) { td.textContent = `earlier: ${lastError}`; td.className = 'state-none'; }
    body.appendChild(tr);
  }
}

// ---------------------------------------------------------------- the plot
function niceMax(x) {
  if (!(x > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (x <= m * p) return m * p;
  return 10 * p;
}

function drawPlot() {
  const canvas = document.getElementById('plot');
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * ratio)), h = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const g = canvas.getContext('2d');
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  const cw = canvas.clientWidth, ch = canvas.clientHeight, top = 16, bottom = ch - 4;
  g.clearRect(0, 0, cw, ch);
  g.strokeStyle = '#2c2c2c'; g.lineWidth = 1;
  for (const f of [0, 0.5, 1]) { const y = top + f * (bottom - top); g.beginPath(); g.moveTo(0, y); g.lineTo(cw, y); g.stroke(); }
  const now = performance.now();
  const series = [['fps', '#6d6', 'fps'], ['ms', '#fa5', 'ms frame time']];
  g.font = '11px system-ui,sans-serif';
  let x0 = 4;
  for (const [key, color, unit] of series) {
    const values = samples.map(p => p[key]).filter(isNum);
    const max = niceMax(Math.max(0, ...values));
    const last = values.length ? values[values.length - 1] : NaN;
    g.fillStyle = color;
    const legend = `${isNum(last) ? +last.toPrecision(3) : '–'} ${unit} (scale 0..${max})`;
    g.fillText(legend, x0, 11);
    x0 += g.measureText(legend).width + 16;
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    let pen = false;
    for (const p of samples) {
      const v = p[key];
      if (!isNum(v)) { pen = false; continue; }
      const x = cw - (now - p.t) / PLOT_WINDOW_MS * cw;
      const y = bottom - Math.min(v / max, 1) * (bottom - top);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    }
    g.stroke();
  }
}

function record(s) {
  const now = performance.now();
  samples.push({t: now, fps: s.fps, ms: s.engine_ms});
  while (samples.length && now - samples[0].t > PLOT_WINDOW_MS) samples.shift();
}

// ---------------------------------------------------------------- the loop
function show(s) {
  const parts = [
    ['status', () => { document.getElementById('status').textContent = statusLine(s); }],
    ['error', () => { document.getElementById('error').textContent = s.error || ''; }],
    ['plot', () => { record(s); drawPlot(); }],
    ['inputs and outputs', () => renderIo(s)],
    ['form', () => follow(s.params)],
  ];
  // one part failing on an unexpected status must not stop the others
  for (const [what, fn] of parts) {
    try { fn(); } catch (e) { console.error(`preview page: showing the ${what} failed`, e); }
  }
}

let reconnects = 0;
function reconnectStream() {
  reconnects += 1;
  document.getElementById('out').src = `/stream.mjpg?reconnect=${reconnects}`;
}

let unreachable = false;
async function poll() {
  try {
    const r = await fetch('/status', {cache: 'no-store'});
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const s = await r.json();
    if (unreachable) reconnectStream();  // the bridge is back (restarted): so is its stream
    unreachable = false;
    show(s && typeof s === 'object' ? s : {});
  } catch (e) {
    unreachable = true;
    document.getElementById('status').textContent = `bridge not reachable (${e.message || e})`;
  }
  setTimeout(poll, POLL_MS);
}

wire();
document.getElementById('form').addEventListener('submit', ev => ev.preventDefault());
// a stream that fails to connect is tried again each second
document.getElementById('out').addEventListener('error', () => setTimeout(reconnectStream, 1000));
poll();
window.addEventListener('resize', drawPlot);
"""
