"""The console in a real browser (headless Chromium through Selenium) against a real
three-node cluster with API tokens: log in, every page, actions (create a volume, attach it,
take a snapshot, cordon a node, plan a drain), live updates (a volume created from the CLI
appears without a reload), and a reader who sees no action. Screenshots of each page go to
$PXC_TEST_ARTIFACTS/console (default: <tmp>/pxcluster-test-artifacts/console)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import Cluster

ADMIN = "console-admin-token-0123456789"
READ = "console-read-token-0123456789"
WAIT = 30.0  # s any page state may take to show up (generous: the machine may be busy)


def _browser_paths() -> tuple[str, str] | None:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


pytestmark = pytest.mark.skipif(
    _browser_paths() is None,
    reason="chromium and chromium-driver are not installed (scripts/install.sh installs them)",
)


def artifacts() -> Path:
    root = os.environ.get("PXC_TEST_ARTIFACTS") or os.path.join(
        tempfile.gettempdir(), "pxcluster-test-artifacts"
    )
    path = Path(root) / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def secured3(cluster: Cluster, tmp_path: Path) -> Cluster:
    admin, read = tmp_path / "admin.token", tmp_path / "read.token"
    admin.write_text(ADMIN + "\n")
    read.write_text(READ + "\n")
    tokens = ("--api-token-file", str(admin), "--api-read-token-file", str(read))
    for name in ("n1", "n2", "n3"):
        cluster.add_node(name, extra=tokens)
    return cluster


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = _browser_paths()
    assert paths is not None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except WebDriverException:
            pass  # the page was being replaced (a navigation or a live swap): look again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# Every control a screen reader reaches has a name: a <label>, an aria-label, or (a button) its
# text. Returns the ones that have none, described.
UNNAMED_CONTROLS = """
return Array.from(document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button'
)).filter(el => !(
    (el.labels && el.labels.length) || el.getAttribute('aria-label') ||
    el.getAttribute('aria-labelledby') || (el.tagName === 'BUTTON' && el.textContent.trim())
)).map(el => el.outerHTML.slice(0, 120));
"""


def checked_page(driver: Any) -> None:
    """The page has labelled controls, landmarks, and said nothing on its console."""
    unnamed = driver.execute_script(UNNAMED_CONTROLS)
    assert unnamed == [], f"controls without an accessible name on {driver.current_url}: {unnamed}"
    assert driver.execute_script("return document.querySelector('main, [role=main]') !== null")
    # Script errors, and any asset that failed to load. A live refresh answered with an
    # error while the cluster moves a volume is the page's to show, not a broken page.
    errors = [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and (e.get("source") != "network" or "/static/" in e.get("message", ""))
    ]
    assert errors == [], f"console errors on {driver.current_url}: {errors}"


def click(driver: Any, css: str) -> None:
    """Click what `css` names; a live update may swap the element out between finding and
    clicking it, so find it again then."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_until(f"a click on {css}", clicked)


def shot(driver: Any, name: str) -> None:
    checked_page(driver)
    # The whole page, not only the window: set the window as tall as the document first.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(artifacts() / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def text(driver: Any, element_id: str = "") -> str:
    """The visible text of the page or of one element, read in the page: live updates swap
    elements, so a WebElement held across a wait goes stale."""
    script = (
        "const e = arguments[0] ? document.getElementById(arguments[0]) : document.body;"
        "return e ? e.innerText : '';"
    )
    return str(driver.execute_script(script, element_id))


def submit(driver: Any, form_css: str, **fields: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    form = driver.find_element(By.CSS_SELECTOR, form_css)
    for name, value in fields.items():
        element = form.find_element(By.NAME, name)
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button").click()


def test_console_in_a_browser(secured3: Cluster, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    c, d = secured3, browser
    n1 = c.nodes["n1"]
    base = f"http://{n1.address}:{n1.ports['api']}"

    # No session: the login page only.
    d.get(base + "/volumes")
    assert d.current_url == base + "/login"
    assert "n2" not in text(d)
    shot(d, "login")
    d.find_element(By.NAME, "token").send_keys("not-the-token")
    d.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait_until("the refusal", lambda: "not valid" in text(d))
    d.get_log("browser")  # that refusal's 401 is the one console error expected
    d.find_element(By.NAME, "token").send_keys(ADMIN)
    d.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait_until("the overview after login", lambda: d.current_url == base + "/")

    # Overview: every node, the leader, etcd, live updates connected.
    wait_until("the overview", lambda: all(n in text(d) for n in ("n1", "n2", "n3")))
    wait_until("all nodes up, etcd healthy", lambda: "3 / 3" in text(d) and "healthy" in text(d))
    wait_until(
        "the live feed",
        lambda: d.execute_script("return document.querySelector('#live-status.on') !== null"),
    )
    shot(d, "overview")

    # Create a volume from the Volumes page; it opens on its own page.
    d.get(base + "/volumes")
    submit(d, "#create-volume", name="web-vol", size="64M", repl="2")
    wait_until("the volume page", lambda: d.current_url == base + "/volumes/web-vol")
    wait_until("the confirmation", lambda: "volume web-vol created" in text(d))
    assert c.inspect("web-vol")["repl"] == 2

    # Attach on n1 from the page: the state changes on the open page, without a reload.
    submit(d, "form[action='/volumes/web-vol/attach']", node="n1")
    wait_until("the attach to be taken", lambda: "attaching on n1" in text(d))
    wait_until(
        "the attachment to show",
        lambda: "attached on n1" in text(d, "vol-summary"),
    )
    uri = c.inspect("web-vol")["nbd_uri"]
    assert uri
    # Some I/O, so the latency chart has something to draw.
    for _ in range(3):
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 7 0 1M",
                "-c",
                "read 0 1M",
                "-c",
                "flush",
                uri,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    # A snapshot from the page.
    submit(d, "#snapshot-form", name="snap1")
    wait_until("the snapshot", lambda: "snap1" in text(d, "snapshots"))
    wait_until("the confirmation", lambda: "snapshot snap1 of web-vol taken" in text(d))
    d.execute_script("window.__same_page = true")
    wait_until(
        "the latency chart",
        lambda: "ms mean" in text(d, "latency"),
        timeout=40,
    )
    assert d.execute_script("return window.__same_page === true")  # swapped in, not reloaded
    shot(d, "volume")

    # A failover drill from the page: its phases show on the timeline as they happen.
    form = d.find_element(By.CSS_SELECTOR, "form[action='/volumes/web-vol/failover']")
    form.find_element(By.NAME, "drill").click()
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait_until("the drill to start", lambda: "failover drill of web-vol to n2" in text(d))
    wait_until(
        "the drill's phase times",
        lambda: (
            "drill" in text(d, "failover-timeline")
            and "in progress" not in text(d, "failover-timeline")
        ),
    )
    assert c.inspect("web-vol")["attached_node"] == "n2"
    shot(d, "volume-after-drill")

    # Kill the serving node: the open page follows the automatic failover, and its timeline
    # grows by the move.
    c.kill("n2")
    wait_until(
        "the failover after n2 was killed",
        lambda: (
            "attached on n1" in text(d, "vol-summary")
            and "automatic" in text(d, "failover-timeline")
        ),
        timeout=60,
    )
    assert c.inspect("web-vol")["attached_node"] == "n1"
    shot(d, "volume-after-kill")
    c.start("n2")

    # Live: a volume created from the CLI appears on the open Volumes page without a reload.
    d.get(base + "/volumes")
    d.execute_script("window.__same_page = true")
    c.cli("volume", "create", "cli-vol", "--size", "32M", "--repl", "1")
    wait_until("cli-vol on the open page", lambda: "cli-vol" in text(d, "volumes"))
    assert d.execute_script("return window.__same_page === true")
    # Filter and sort without JavaScript's help: the query string does it on the server.
    d.get(base + "/volumes?q=cli&sort=size&desc=1")
    rows = d.find_elements(By.CSS_SELECTOR, "table.volumes tbody tr[data-volume]")
    assert [r.get_attribute("data-volume") for r in rows] == ["cli-vol"]
    d.get(base + "/volumes?sort=size&desc=1")
    rows = d.find_elements(By.CSS_SELECTOR, "table.volumes tbody tr[data-volume]")
    assert [r.get_attribute("data-volume") for r in rows] == ["web-vol", "cli-vol"]
    shot(d, "volumes")

    # Nodes: cordon n3, then the drain plan of n2 (a dry run: nothing changes).
    d.get(base + "/nodes")
    click(d, "form[action='/nodes/n3/cordon'] button")
    wait_until("n3 cordoned", lambda: "node n3 cordoned" in text(d))
    assert c.node_state("n3")["state"] == "cordoned"
    assert "cordoned" in text(d, "node-n3")
    shot(d, "nodes")
    click(d, "a[href='/nodes/n2/drain']")
    wait_until("the drain plan", lambda: "Drain n2: the plan" in text(d))
    assert "web-vol" in text(d) or "cli-vol" in text(d)
    assert c.node_state("n2")["state"] == "active"
    shot(d, "drain-plan")

    # Uncordon n3, then drain n2 for real from its plan (its replicas have somewhere to go
    # now): progress on the overview, then drained.
    d.get(base + "/nodes")
    click(d, "form[action='/nodes/n3/uncordon'] button")
    wait_until("n3 active again", lambda: "node n3 is active again" in text(d))
    d.get(base + "/nodes/n2/drain")
    wait_until("the drain plan", lambda: "Drain n2: the plan" in text(d))
    assert not d.find_elements(By.NAME, "force")  # no volume would lose a replica
    click(d, "form[action='/nodes/n2/drain'] button")
    wait_until("the drain to start", lambda: "drain of n2 started" in text(d))
    d.get(base + "/")
    d.execute_script("window.__same_page = true")

    def drained_on_page() -> bool:
        return "drained" in text(d, "capacity")

    # The small volumes here move in well under a second: the progress bar may come and go
    # between two live updates, so the outcome is what must reach the open page.
    wait_until("n2 drained, on the open overview", drained_on_page, timeout=90)
    assert c.node_state("n2")["state"] == "drained"
    assert d.execute_script("return window.__same_page === true")
    shot(d, "overview-after-drain")

    # The overview once more, with volumes in it; then log out.
    d.get(base + "/")
    wait_until("the volumes on the overview", lambda: "rebuilds and drains" in text(d).lower())
    shot(d, "overview-with-volumes")
    d.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    wait_until("the login page", lambda: d.current_url == base + "/login")

    # A reader sees everything and no action.
    d.find_element(By.NAME, "token").send_keys(READ)
    d.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait_until("the overview after login", lambda: d.current_url == base + "/")
    d.get(base + "/volumes/web-vol")
    assert "snap1" in text(d) and "read-only" in text(d)
    assert not d.find_elements(By.ID, "volume-actions")
    d.get(base + "/volumes")
    assert not d.find_elements(By.ID, "create-volume")
    shot(d, "volume-read-only")
