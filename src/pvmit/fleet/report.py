"""The plan as one self-contained HTML file an operator can open offline: inline CSS and JavaScript, no network.

Sections: summary figures; a heat map of host classes (CPU model and settings) against VM classes, coloured
safe / forced / exposed, where a click on a cell shows the forced controls and reasons; pool sizes; searchable,
sortable tables of VMs, hosts, VM classes and moves. Table data travel as one JSON block that the page's script
renders with textContent, so nothing from the inventory is ever parsed as HTML.
"""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

from pvmit import __version__
from pvmit.catalog.facts import CpuFacts
from pvmit.fleet.plan import VERDICTS, Plan, Verdict

MAX_VM_ROWS = 100_000
"""VMs listed in the report's table (those without a safe destination and those exposed where they run first)."""
MAX_HEATMAP_COLUMNS = 300
"""VM classes shown in the heat map, largest first."""


def _vm_rows(plan: Plan, limit: int) -> tuple[list[list[Any]], int]:
    f = plan.fleet
    n = f.num_vms
    if n == 0:
        return [], 0
    movable = plan.movable
    # the VMs an operator must look at first: nowhere to go, then exposed where they run, then the rest
    priority = np.where(movable == 0, 0, np.where(plan.vm_here == Verdict.EXPOSED, 1, 2))
    order = np.lexsort((np.arange(n), priority))[:limit]
    names = f.vm_names.take(order).to_pylist() if order.size < n else f.vm_names.to_pylist()
    pool_ids = [p.id for p in plan.pools]
    rows = []
    for name, i in zip(names, order.tolist(), strict=True):
        cls = int(f.vm_class[i])
        pool = int(plan.vm_class_pool[cls])
        c = plan.vm_counts[i]
        rows.append([name, f.host_names[int(f.vm_host[i])], f"C{cls}", pool_ids[pool] if pool >= 0 else "-",
                     VERDICTS[int(plan.vm_here[i])].word, int(c[0]), int(c[1]), int(c[2]),
                     "no" if movable[i] == 0 else "yes"])
    return rows, n


def report_data(plan: Plan, max_vm_rows: int = MAX_VM_ROWS) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    f = plan.fleet
    counts = plan.counts()
    vm_rows, vm_total = _vm_rows(plan, max_vm_rows)
    pool_ids = [p.id for p in plan.pools]
    host_rows = [[name, hc.cpu, hc.settings.label(), cluster or "-", f"H{k}"]
                 for name, k, cluster in zip(f.host_names, f.host_class.tolist(), f.host_cluster, strict=True)
                 for hc in (f.host_classes[k],)]
    class_rows = [[f"C{i}", c.personality, c.mitigations, c.form.value if c.form else "none",
                   str(c.to_json()["supported"]), c.settings.label(), int(plan.vm_class_size[i]),
                   pool_ids[int(plan.vm_class_pool[i])] if plan.vm_class_pool[i] >= 0 else "-",
                   *(int(plan.class_counts[i, v]) for v in VERDICTS)] for i, c in enumerate(f.vm_classes)]
    pair_rows = [[f"C{i}", f"H{j}", f.host_classes[j].label, VERDICTS[int(plan.verdict[i, j])].word,
                  ", ".join(plan.moves[int(plan.move_of[i, j])].forced) or "-", int(plan.move_of[i, j])]
                 for i in range(len(f.vm_classes)) for j in range(len(f.host_classes))]
    return {
        "counts": counts,
        "moves": [{"verdict": m.verdict.word, "forced": list(m.forced), "reasons": list(m.reasons),
                   "warnings": list(m.warnings), "accepted": m.accepted} for m in plan.moves],
        "vm_classes": [c.label for c in f.vm_classes],
        "host_classes": [c.label for c in f.host_classes],
        "tables": {
            "vms": {"columns": ["VM", "host", "class", "pool", "where it runs", "safe", "forced", "exposed",
                                "can move"], "rows": vm_rows, "total": vm_total, "verdict": 4},
            "hosts": {"columns": ["host", "CPU", "settings", "cluster", "class"], "rows": host_rows,
                      "total": len(host_rows)},
            "classes": {"columns": ["class", "personality", "mitigations", "form", "MITIGATION_ENUM", "settings",
                                    "VMs", "pool", "safe hosts", "forced hosts", "exposed hosts"],
                        "rows": class_rows, "total": len(class_rows)},
            "pairs": {"columns": ["VM class", "host class", "host", "verdict", "forced", "move"],
                      "rows": pair_rows, "total": len(pair_rows), "verdict": 3, "move": 5},
        },
    }


_CSS = """
:root { --safe:#2e8b57; --forced:#e0a100; --exposed:#c62828; --ink:#1d2330; --muted:#5f6b7a; --line:#d8dde6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); margin: 0;
       background: #f5f7fa; }
header { background: #1d2330; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c5cbd6; font-size: 13px; }
main { padding: 18px 28px 40px; max-width: 1600px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px; margin: 16px 0; }
h2 { font-size: 17px; margin: 0 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fafbfd; }
.card .n { font-size: 24px; font-weight: 650; }
.card .l { color: var(--muted); font-size: 12px; }
.card.bad .n { color: var(--exposed); } .card.warn .n { color: #a87600; } .card.good .n { color: var(--safe); }
.legend span { display: inline-block; margin-right: 14px; }
.sw { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 4px; }
.v-safe, td.v-safe { background: var(--safe); } .v-forced, td.v-forced { background: var(--forced); }
.v-exposed, td.v-exposed { background: var(--exposed); }
.heat { overflow: auto; max-height: 70vh; border: 1px solid var(--line); }
table.heatmap { border-collapse: separate; border-spacing: 1px; font-size: 11px; }
table.heatmap th { position: sticky; background: #fff; font-weight: 500; white-space: nowrap; }
table.heatmap thead th { top: 0; z-index: 1; height: 110px; vertical-align: bottom; }
table.heatmap thead th div { writing-mode: vertical-rl; transform: rotate(180deg); max-height: 105px;
                             overflow: hidden; }
table.heatmap tbody th { left: 0; text-align: right; padding-right: 6px; z-index: 1; }
table.heatmap td { width: 14px; min-width: 14px; height: 16px; cursor: pointer; border-radius: 2px; }
table.heatmap td.sel { outline: 2px solid #1d2330; }
table.heatmap td.w, .sw.w { background-image: radial-gradient(circle, #fff 2px, transparent 2.6px); }
#cell-detail { margin-top: 10px; padding: 10px; border-left: 4px solid var(--line); background: #fafbfd;
               white-space: pre-wrap; min-height: 2em; }
.bars .row { display: grid; grid-template-columns: 60px 1fr 120px; align-items: center; gap: 8px; margin: 3px 0; }
.bar { height: 14px; background: #4a6fa5; border-radius: 3px; }
.bar.vms { background: #8aa6cf; height: 8px; }
.muted { color: var(--muted); }
.tbl .tools { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; }
.tbl input.search { flex: 0 1 360px; padding: 6px 9px; border: 1px solid var(--line); border-radius: 6px; }
.tbl .wrap { max-height: 60vh; overflow: auto; border: 1px solid var(--line); }
.tbl table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
.tbl th { position: sticky; top: 0; background: #eef1f6; text-align: left; cursor: pointer; user-select: none;
          padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
.tbl td { padding: 4px 8px; border-bottom: 1px solid #eef0f4; }
.tbl td.v-safe, .tbl td.v-forced, .tbl td.v-exposed { color: #fff; font-weight: 600; }
.errors li { font-family: ui-monospace, monospace; font-size: 12px; }
"""

_JS = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("fleet-data").textContent);
const LIMIT = 500;
function cmp(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, {numeric: true});
}
function showMove(k, title) {
  const m = DATA.moves[k];
  const box = document.getElementById("cell-detail");
  box.style.borderLeftColor = getComputedStyle(document.documentElement).getPropertyValue("--" + m.verdict);
  let text = title + "\n" + m.verdict.toUpperCase() + (m.forced.length ? ": forces " + m.forced.join(", ") : "");
  if (!m.accepted) text += " (pvmit would refuse this migration)";
  text += "\n\n" + m.reasons.map(r => "- " + r).join("\n");
  if (m.warnings.length) text += "\n\nwarnings:\n" + m.warnings.map(w => "- " + w).join("\n");
  box.textContent = text;
}
function setupHeatmap() {
  const t = document.getElementById("heatmap");
  if (!t) return;
  t.addEventListener("click", ev => {
    const td = ev.target.closest("td[data-m]");
    if (!td) return;
    t.querySelectorAll("td.sel").forEach(x => x.classList.remove("sel"));
    td.classList.add("sel");
    const vc = Number(td.dataset.c), hc = Number(td.parentElement.dataset.h);
    showMove(Number(td.dataset.m), "VM class C" + vc + ": " + DATA.vm_classes[vc] + "\non host class H" + hc + ": "
             + DATA.host_classes[hc]);
  });
}
function setupTable(id) {
  const spec = DATA.tables[id];
  const root = document.getElementById("t-" + id);
  const input = root.querySelector("input.search");
  const thead = root.querySelector("thead tr");
  const tbody = root.querySelector("tbody");
  const count = root.querySelector(".count");
  const hay = spec.rows.map(r => r.join(" \u0001 ").toLowerCase());
  let sortCol = -1, dir = 1;
  spec.columns.forEach((c, i) => {
    const th = document.createElement("th");
    th.textContent = c;
    th.addEventListener("click", () => { dir = sortCol === i ? -dir : 1; sortCol = i; render(); });
    thead.appendChild(th);
  });
  function render() {
    const terms = input.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    let idx = [];
    for (let i = 0; i < spec.rows.length; i++)
      if (terms.every(t => hay[i].includes(t))) idx.push(i);
    if (sortCol >= 0) idx.sort((a, b) => cmp(spec.rows[a][sortCol], spec.rows[b][sortCol]) * dir);
    const frag = document.createDocumentFragment();
    for (const i of idx.slice(0, LIMIT)) {
      const tr = document.createElement("tr");
      spec.rows[i].forEach((v, c) => {
        const td = document.createElement("td");
        td.textContent = v;
        if (c === spec.verdict) td.className = "v-" + v;
        if (c === spec.move) { td.style.cursor = "pointer"; td.title = "show reasons";
          td.addEventListener("click", () => showMove(v, spec.rows[i][0] + " on " + spec.rows[i][2])); }
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
    let text = idx.length + " of " + spec.rows.length + " rows";
    if (idx.length > LIMIT) text += ", first " + LIMIT + " shown (search to narrow)";
    if (spec.total > spec.rows.length) text += "; the report holds " + spec.rows.length + " of " + spec.total;
    count.textContent = text;
  }
  let timer = 0;  // large tables: filter once typing pauses, not on every key
  input.addEventListener("input", () => {
    clearTimeout(timer);
    if (spec.rows.length < 20000) render(); else timer = setTimeout(render, 150);
  });
  render();
}
setupHeatmap();
for (const id of Object.keys(DATA.tables)) setupTable(id);
document.body.dataset.ready = "1";
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _card(n: int, label: str, tone: str = "") -> str:
    return f'<div class="card {tone}"><div class="n">{n:,}</div><div class="l">{_e(label)}</div></div>'


def _heatmap(plan: Plan, max_columns: int) -> str:
    f = plan.fleet
    nvc = len(f.vm_classes)
    largest = [int(i) for i in np.argsort(-plan.vm_class_size, kind="stable")[:max_columns]] if nvc else []

    def cpu_order(facts: CpuFacts, label: str) -> tuple[str, int, int, str]:
        return facts.vendor, facts.family, facts.model, label  # roughly by generation within a vendor

    cols = sorted(largest, key=lambda i: (cpu_order(f.vm_classes[i].facts, f.vm_classes[i].label), i))
    head = "".join(f'<th title="{_e(f"C{i}: {f.vm_classes[i].label} ({int(plan.vm_class_size[i]):,} VMs)")}">'
                   f"<div>C{i} {_e(f.vm_classes[i].personality)} / {_e(f.vm_classes[i].mitigations)}</div></th>"
                   for i in cols)
    order = sorted(range(len(f.host_classes)), key=lambda j: (cpu_order(f.host_classes[j].facts,
                                                                       f.host_classes[j].label), j))
    body = []
    for j in order:
        hc = f.host_classes[j]
        cells = []
        for i in cols:
            m = plan.moves[int(plan.move_of[i, j])]
            tip = m.verdict.word + (": " + ", ".join(m.forced) if m.forced else "") + \
                (" (with warnings)" if m.warnings else "")
            warned = " w" if m.warnings else ""
            cells.append(f'<td class="v-{m.verdict.word}{warned}" data-c="{i}" data-m="{int(plan.move_of[i, j])}" '
                         f'title="{_e(tip)}"></td>')
        body.append(f'<tr data-h="{j}"><th title="{_e(hc.label)} ({int(plan.host_class_size[j]):,} hosts)">'
                    f"H{j} {_e(hc.label)} <span class='muted'>({int(plan.host_class_size[j]):,})</span></th>"
                    + "".join(cells) + "</tr>")
    note = "" if len(cols) == nvc else (f'<p class="muted">The {len(cols)} largest of {nvc} VM classes are shown; '
                                        "the VM classes table lists all.</p>")
    return (f'{note}<div class="heat"><table class="heatmap" id="heatmap"><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _pools(plan: Plan) -> str:
    if not plan.pools:
        return '<p class="muted">No pools: no VM class has a host that would take it.</p>'
    hc = plan.fleet.host_classes
    top_h = max(p.hosts for p in plan.pools) or 1
    top_v = max(p.vms for p in plan.pools) or 1
    rows = []
    for p in plan.pools:
        cpus = ", ".join(sorted({hc[h].cpu for h in p.host_classes}))
        rows.append(
            f'<div class="row" data-pool="{_e(p.id)}"><b>{_e(p.id)}</b><div>'
            f'<div class="bar" style="width:{100 * p.hosts / top_h:.1f}%"></div>'
            f'<div class="bar vms" style="width:{100 * p.vms / top_v:.1f}%"></div></div>'
            f'<span>{p.hosts:,} hosts, {p.vms:,} VMs</span></div>'
            f'<div class="muted" style="margin:0 0 8px 68px">{len(p.vm_classes)} VM classes; CPUs: {_e(cpus)}; '
            f"{p.forcing_hosts:,} of its hosts force controls for some of them; may show "
            f"{len(p.shows)} speculation bits (MITIGATION_ENUM {p.mitigation_enum:#x})"
            + (f"; bits that keep its VMs off other hosts: {_e(', '.join(p.constraining_bits))}"
               if p.constraining_bits else "") + "</div>")
    return ('<p class="muted">A pool is a set of hosts among which every VM of its classes may move freely (safe, '
            "or safe with forced controls). Dark bar: hosts; light bar: VMs.</p>"
            f'<div class="bars">{"".join(rows)}</div>')


def _table(id_: str, title: str, hint: str) -> str:
    return (f'<section class="tbl" id="t-{id_}"><h2>{_e(title)}</h2><div class="tools">'
            f'<input class="search" type="search" placeholder="search {_e(hint)}" aria-label="search {_e(title)}">'
            f'<span class="count muted"></span></div><div class="wrap"><table><thead><tr></tr></thead>'
            "<tbody></tbody></table></div></section>")


def render_report(plan: Plan, title: str = "pvmit fleet report", max_vm_rows: int = MAX_VM_ROWS,
                  max_heatmap_columns: int = MAX_HEATMAP_COLUMNS) -> str:
    """The whole report as one HTML string."""
    f = plan.fleet
    data = report_data(plan, max_vm_rows)
    c = data["counts"]
    here = c["vms_by_verdict_on_own_host"]
    cards = "".join([
        _card(c["hosts"], "hosts"), _card(c["vms"], "VMs"), _card(c["host_classes"], "host classes"),
        _card(c["vm_classes"], "VM classes"), _card(c["pools"], "migration pools"),
        _card(c["vms_without_safe_destination"], "VMs with no safe destination outside their host",
              "bad" if c["vms_without_safe_destination"] else "good"),
        _card(here["exposed"], "VMs exposed where they run now", "bad" if here["exposed"] else "good"),
        _card(here["forced"], "VMs protected by forced controls now", "warn" if here["forced"] else ""),
        _card(c["unenlightened_vms"], "unenlightened VMs (never reported)"),
        _card(c["row_errors"], "inventory rows with errors", "bad" if c["row_errors"] else "good"),
    ])
    errors = f.errors.first(200)
    err_html = "" if not errors else (
        f'<section class="errors"><h2>Inventory errors ({f.errors.total:,}; these rows were left out)</h2><ul>'
        + "".join(f"<li>{_e(e)}</li>" for e in errors) + "</ul>"
        + (f'<p class="muted">{f.errors.total - len(errors):,} more; `pvmit fleet plan --json` lists them.</p>'
           if f.errors.total > len(errors) else "") + "</section>")
    stranded = plan.stranded
    strand_html = ""
    if stranded.size:
        names = f.vm_names.take(stranded[:50]).to_pylist()
        strand_html = (f"<p><b>{stranded.size:,} VMs have no safe destination outside their host</b>, e.g. "
                       + _e(", ".join(names)) + ". Search the VMs table for <i>no</i> under “can move”.</p>")
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    legend = "".join(f'<span><i class="sw v-{v.word}"></i>{v.word}</span>' for v in VERDICTS) + \
        '<span><i class="sw w" style="background-color:#777"></i>with warnings</span>'
    files = set(f.sources.values())
    sources = f"inventory: {next(iter(files))}" if len(files) == 1 else \
        ", ".join(f"{k}: {v}" for k, v in f.sources.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{_e(title)}</h1><p>{_e(sources)} &middot; pvmit {_e(__version__)} &middot;
{c['class_pairs']:,} class pairs judged with {c['decisions']:,} policy decisions</p></header><main>
<section id="summary"><h2>Summary</h2><div class="cards">{cards}</div>{strand_html}</section>
{err_html}
<section id="heat"><h2>Host classes against VM classes</h2>
<p class="legend muted">{legend} &middot; safe: nothing forced; forced: safe because IA32_SPEC_CTRL controls are forced
there; exposed: a mitigation the VM relies on (or was promised) cannot be kept effective. A dot: the policy
warns (a trusted unenlightened guest probably relies on something ineffective there, or a forced control is only
modelled). Rows: host classes (CPU, operator settings, hosts); columns: VM classes. Click a cell for the
reasons.</p>{_heatmap(plan, max_heatmap_columns)}<div id="cell-detail" class="muted">Click a cell.</div></section>
<section id="pools"><h2>Migration pools</h2>{_pools(plan)}</section>
{_table("vms", "VMs", "VMs, hosts, classes, pools, verdicts")}
{_table("classes", "VM classes", "personality, mitigations, form")}
{_table("hosts", "Hosts", "hosts, CPUs, clusters")}
{_table("pairs", "Moves by class pair", "classes, CPUs, verdicts, controls")}
</main>
<script type="application/json" id="fleet-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
