"""Open a maect.viz report in headless Chromium (Debian's chromium + chromium-driver, driven by selenium) from
file://, check it, and optionally save a screenshot:

    python tools/report_browser.py runs/tiny/report/index.html [--screenshot report.png] [--width 1360]
                                   [--height 1500] [--scroll-to '#clusters-1']

Checks (check_page): the browser's console has no error; every request the page made is a file:// or data: URL
(nothing tried the network) and none failed (Network.loadingFailed in the performance log, e.g. a missing
thumbnail); every <img> is complete with naturalWidth > 0. It prints the counts of cluster sections, neighbour rows
and images. The browser starts with a fresh profile and everything that reaches out switched off
(--disable-background-networking, --disable-component-update, --disable-sync, --disable-quic), so it runs on a
machine without a network. Needs: apt-get install chromium chromium-driver; pip install selenium.
The screenshot is --height px of the page at --width px (from the top, or from the element --scroll-to selects), stored as a palette PNG (small, exact for the
page's flat colours and grey thumbnails).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def find_browser() -> tuple[str | None, str | None]:
    """(chromium binary, chromedriver binary), None for each one missing."""
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@contextmanager
def chromium(width: int = 1360, height: int = 1500):
    """A headless Chromium driven by selenium, with the browser and performance logs on and a fresh profile
    (deleted afterwards). RuntimeError names what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise RuntimeError("selenium is not installed: pip install selenium (or ./setup.sh)") from None
    binary, driver_path = find_browser()
    if not binary or not driver_path:
        raise RuntimeError("chromium and chromium-driver are needed: apt-get install chromium chromium-driver "
                           "(./setup.sh does it)")
    os.environ.setdefault("SE_OFFLINE", "true")       # selenium's driver manager: never download anything
    profile = tempfile.mkdtemp(prefix="maect_chromium_")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


IMAGES_JS = """return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"""


def check_page(driver, path: str) -> dict:
    """Load `path` from file:// and return {'errors': [console errors], 'failed': [failed request URLs and why],
    'remote': [requests to anything but file: / data:], 'broken': [srcs of images not loaded], 'images',
    'clusters' (section.cluster), 'cluster_groups' (section.clusters), 'rows' (div.nn-row), 'row_sets' (nn-set per
    row), 'row_thumbs' (thumbnails per nn-set), 'title'}."""
    url = "file://" + os.path.abspath(path)
    driver.get("about:blank")
    driver.get_log("browser"), driver.get_log("performance")    # drop the start page's entries
    driver.get(url)
    driver.execute_script("return document.readyState")
    imgs = driver.execute_script(IMAGES_JS)
    errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    failed, remote = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        p = msg.get("params", {})
        if msg.get("method") == "Network.requestWillBeSent":
            u = p.get("request", {}).get("url", "")
            if not u.startswith(("file:", "data:")):
                remote.append(u)
        elif msg.get("method") == "Network.loadingFailed":
            failed.append(f"{p.get('requestId')}: {p.get('errorText')}")
        elif msg.get("method") == "Network.responseReceived" and p.get("response", {}).get("status", 0) >= 400:
            failed.append(f"{p['response'].get('url')}: HTTP {p['response']['status']}")
    count = lambda css: driver.execute_script(f"return document.querySelectorAll({css!r}).length")   # noqa: E731
    rows = driver.execute_script("return Array.from(document.querySelectorAll('div.nn-row')).map(r => "
                                 "Array.from(r.querySelectorAll('.nn-set')).map(s => "
                                 "s.querySelectorAll('figure.t').length))")
    return {"errors": errors, "failed": failed, "remote": remote, "images": len(imgs),
            "broken": [s for s, done, w in imgs if not (done and w > 0)], "clusters": count("section.cluster"),
            "cluster_groups": count("section.clusters"), "rows": len(rows), "row_sets": [len(r) for r in rows],
            "row_thumbs": sorted({n for r in rows for n in r}), "title": driver.title}


def screenshot(driver, png: str) -> None:
    """The visible window as a palette PNG (Pillow's adaptive palette, 256 colours)."""
    import io

    from PIL import Image
    im = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(png, optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page")
    p.add_argument("--screenshot", default=None)
    p.add_argument("--width", type=int, default=1360)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--scroll-to", default=None, metavar="CSS", help="screenshot from this element down")
    a = p.parse_args(argv)
    if not os.path.isfile(a.page):
        sys.exit(f"report_browser: {a.page!r}: no such file")
    with chromium(a.width, a.height) as d:
        r = check_page(d, a.page)
        if a.screenshot:
            if a.scroll_to:
                d.execute_script("document.querySelector(arguments[0]).scrollIntoView()", a.scroll_to)
            screenshot(d, a.screenshot)
    print(f"{a.page}: {r['images']} images ({len(r['broken'])} not loaded), {r['cluster_groups']} cluster groups "
          f"with {r['clusters']} clusters, {r['rows']} neighbour rows, {len(r['errors'])} console errors, "
          f"{len(r['failed'])} failed and {len(r['remote'])} non-file requests"
          + (f"; screenshot {a.screenshot}" if a.screenshot else ""))
    for k in ("errors", "failed", "remote", "broken"):
        for x in r[k][:5]:
            print(f"  {k}: {x}")
    return int(bool(r["errors"] or r["failed"] or r["remote"] or r["broken"]))


if __name__ == "__main__":
    sys.exit(main())
