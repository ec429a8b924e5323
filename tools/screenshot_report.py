#!/usr/bin/env python3
"""Screenshot a fleet report in headless Chromium (Debian's chromium + chromium-driver, through selenium).

    .venv/bin/python tools/screenshot_report.py [REPORT.html] [-o report.png] [--width 1400]

Without REPORT.html, writes the report of the shipped sample inventory first. The PNG shows the whole page.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chrome(user_data: Path, width: int, height: int):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={user_data}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        sys.exit("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    return webdriver.Chrome(options=opts, service=Service(driver))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("fleet-report.png"))
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = args.report
        if report is None:
            report = Path(tmp) / "report.html"
            subprocess.run([sys.executable, "-m", "pvmit", "fleet", "report", "--quiet", "-o", str(report),
                            str(Path(__file__).resolve().parent.parent / "src/pvmit/fleet/data/sample-inventory.json")],
                           check=True)
        d = chrome(Path(tmp) / "profile", args.width, 1000)
        try:
            d.get(report.resolve().as_uri())
            # the whole page at this viewport (so tables keep their 60vh height), through the DevTools protocol
            size = d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            shot = d.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1}})
            args.output.write_bytes(base64.b64decode(shot["data"]))
        finally:
            d.quit()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
