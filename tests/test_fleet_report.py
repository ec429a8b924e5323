"""The HTML fleet report: self-contained, escaped, the right heat map; and in a real headless Chromium (Debian's
chromium + chromium-driver through selenium): it renders without errors, colours, click details, search, sort."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import host, plan_of, vm, write_json

from pvmit.catalog.loader import Catalog
from pvmit.fleet.generate import sample_path
from pvmit.fleet.plan import Plan, Verdict
from pvmit.fleet.report import render_report

EVIL = '<img src=x onerror="window.__pwned=1">"&\'</script>'


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data: dict[str, str] = {}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        self._in = a.get("id") if tag == "script" else None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.data[self._in] = self.data.get(self._in, "") + data


def _fleet(catalog: Catalog, tmp_path: Path) -> Plan:
    """Two VMs (one named like an attack) rely on retpoline and carry force_off RRSBA_DIS_S: outside their Ice Lake
    host nothing can keep retpoline effective for them, so they have no safe destination."""
    hosts = [host("icx-1", "icelake-sp"), host("spr-1", "sapphirerapids"), host("clx-1", "cascadelake-sp"),
             host("spr-off", "sapphirerapids", force_off="RRSBA_DIS_S")]
    stuck = {"force_off": "RRSBA_DIS_S"}
    vms = [vm("rp-1", "icx-1", "icelake-server-v2", "retpoline"),
           vm("bhb-1", "clx-1", "cascadelake-server-v2", "bhb-short", form="kvm"),
           vm(EVIL, "icx-1", "icelake-server-v2", "retpoline", **stuck),
           vm("stuck", "icx-1", "icelake-server-v2", "retpoline", **stuck)]
    return plan_of(catalog, write_json(tmp_path / "inv.json", hosts, vms))


def test_report_is_self_contained_and_escaped(catalog: Catalog, tmp_path: Path) -> None:
    p = _fleet(catalog, tmp_path)
    text = render_report(p)
    t = Tags()
    t.feed(text)
    assert not [a for _, a in t.tags if "src" in a or "href" in a], "nothing may be loaded from elsewhere"
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert EVIL not in text and html.escape(EVIL) in text  # named among the VMs that cannot move, as text
    assert not [(tag, a) for tag, a in t.tags if tag == "img" or "onerror" in a]
    ids = {a.get("id") for _, a in t.tags}
    assert {"summary", "heat", "pools", "t-vms", "t-classes", "t-hosts", "t-pairs", "heatmap", "cell-detail",
            "fleet-data"} <= ids
    data = json.loads(t.data["fleet-data"])
    vms = data["tables"]["vms"]
    assert vms["total"] == len(vms["rows"]) == p.fleet.num_vms
    assert EVIL in [r[0] for r in vms["rows"]]  # the name travels as data and is shown with textContent
    assert vms["rows"][0][8] == "no"  # VMs without a safe destination come first
    cells = [a for tag, a in t.tags if tag == "td" and "data-m" in a]
    assert len(cells) == len(p.fleet.vm_classes) * len(p.fleet.host_classes)
    f = p.fleet
    for a in cells:
        i, k = int(str(a["data-c"])), int(str(a["data-m"]))
        assert f"v-{p.moves[k].verdict.word}" in str(a["class"]).split()
    # the retpoline guest's cell on Sapphire Rapids is the forced move with RRSBA_DIS_S
    names = f.vm_names.to_pylist()
    i = int(f.vm_class[names.index("rp-1")])
    j = int(f.host_class[f.host_names.index("spr-1")])
    k = int(p.move_of[i, j])
    assert data["moves"][k]["verdict"] == "forced" and data["moves"][k]["forced"] == ["RRSBA_DIS_S"]
    assert Verdict(int(p.verdict[i, j])) is Verdict.FORCED


def test_report_limits_the_vm_table(catalog: Catalog, tmp_path: Path) -> None:
    p = _fleet(catalog, tmp_path)
    t = Tags()
    t.feed(render_report(p, max_vm_rows=2, max_heatmap_columns=3))
    data = json.loads(t.data["fleet-data"])
    assert data["tables"]["vms"]["total"] == p.fleet.num_vms and len(data["tables"]["vms"]["rows"]) == 2
    assert sorted(r[0] for r in data["tables"]["vms"]["rows"]) == sorted([EVIL, "stuck"])  # the stranded ones
    assert len([a for tag, a in t.tags if tag == "td" and "data-m" in a]) == 3 * len(p.fleet.host_classes)


# --- in a real browser ----------------------------------------------------------------------------------------

def _driver(profile: Path) -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        d = _driver(Path(tmp))
        try:
            yield d
        finally:
            d.quit()


def test_report_in_headless_chromium(catalog: Catalog, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    doc = json.loads(sample_path().read_text())
    doc["vms"].append(vm(EVIL, doc["vms"][0]["host"], "EPYC-Milan", "none"))
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps(doc))
    p = plan_of(catalog, inv)
    report = tmp_path / "report.html"
    report.write_text(render_report(p))
    d = browser
    d.get(report.as_uri())
    WebDriverWait(d, 20).until(lambda x: x.execute_script("return document.body.dataset.ready") == "1")
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []

    # heat map: every class pair, coloured by verdict
    cells = d.find_elements(By.CSS_SELECTOR, "#heatmap td[data-m]")
    assert len(cells) == len(p.fleet.vm_classes) * len(p.fleet.host_classes)
    colour = {v: d.execute_script(
        f"const c = document.querySelector('#heatmap td.v-{v}'); return c && getComputedStyle(c).backgroundColor")
        for v in ("safe", "forced", "exposed")}
    assert colour == {"safe": "rgb(46, 139, 87)", "forced": "rgb(224, 161, 0)", "exposed": "rgb(198, 40, 40)"}
    forced = d.find_element(By.CSS_SELECTOR, "#heatmap td.v-forced")
    d.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", forced)
    forced.click()
    detail = d.find_element(By.ID, "cell-detail").text
    assert detail.startswith("VM class C") and "FORCED: forces " in detail and "- " in detail

    # VMs table: search, data shown as text, sort
    count = d.find_element(By.CSS_SELECTOR, "#t-vms .count")
    n = p.fleet.num_vms
    assert count.text == f"{n} of {n} rows"
    search = d.find_element(By.CSS_SELECTOR, "#t-vms input.search")
    search.send_keys("billing-db")
    rows = d.find_elements(By.CSS_SELECTOR, "#t-vms tbody tr")
    assert len(rows) == 2 and count.text == f"2 of {n} rows"
    assert {r.find_element(By.CSS_SELECTOR, "td").text for r in rows} == {"billing-db-01", "billing-db-02"}
    search.clear()
    search.send_keys("onerror")
    rows = d.find_elements(By.CSS_SELECTOR, "#t-vms tbody tr")
    assert len(rows) == 1
    assert d.execute_script("return arguments[0].textContent", rows[0].find_element(By.CSS_SELECTOR, "td")) == EVIL
    assert d.execute_script("return window.__pwned") is None
    search.clear()
    search.send_keys(" ")  # an empty query shows every row again
    header = [h for h in d.find_elements(By.CSS_SELECTOR, "#t-vms thead th") if h.text == "safe"][0]
    header.click()
    first = [int(r.find_elements(By.CSS_SELECTOR, "td")[5].text)
             for r in d.find_elements(By.CSS_SELECTOR, "#t-vms tbody tr")[:50]]
    assert first == sorted(first) and len(first) == 50
    header.click()
    first = [int(r.find_elements(By.CSS_SELECTOR, "td")[5].text)
             for r in d.find_elements(By.CSS_SELECTOR, "#t-vms tbody tr")[:50]]
    assert first == sorted(first, reverse=True)

    # pools
    assert len(d.find_elements(By.CSS_SELECTOR, "#pools .row[data-pool]")) == len(p.pools)
    assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []


def test_screenshot_tool(catalog: Catalog, tmp_path: Path) -> None:
    """tools/screenshot_report.py writes a PNG of the whole page."""
    import subprocess
    import sys

    from conftest import REPO

    _driver(tmp_path / "probe").quit()  # skips where there is no browser
    report = tmp_path / "r.html"
    report.write_text(render_report(_fleet(catalog, tmp_path)))
    out = tmp_path / "r.png"
    subprocess.run([sys.executable, str(REPO / "tools" / "screenshot_report.py"), str(report), "-o", str(out),
                    "--width", "900"], check=True, capture_output=True, timeout=120)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 880 and height > 1000  # the whole page, not just the window
