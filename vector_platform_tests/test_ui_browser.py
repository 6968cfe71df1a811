"""The Dagster UI in a real browser: `vector-platform dev` (what `make dev` runs) on the test's
embedded Postgres, driven by Playwright in Debian's chromium.

It checks what a user sees: every sensor and schedule running, every asset and asset check
of the code location on the pages, a collection materialized by clicks (Materialize all, its
partition, Launch backfill) with every check passed, and a tier move submitted by the CLI
shown as a successful run. Screenshots go to $VP_TEST_ARTIFACTS/ui_browser (else pytest's
tmp dir); with VP_UPDATE_SCREENSHOTS=1 the lineage graph also goes to docs/lineage-graph.png.

Playwright never downloads a browser here (`playwright install` is not used): it launches
/usr/bin/chromium, which `.ci/run` installs with apt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from vector_platform.definitions import build_definitions

from .conftest import _free_port, cli, instance_env, write_jsonl

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", "--no-first-run",
]
UI_WAIT_MS = 60_000  # a page of the UI on a loaded 2-core machine
RUN_WAIT_S = 300  # a backfill of the whole graph for 5 documents, or a tier move
DOCS = [
    "Ferns reproduce by spores carried on the underside of their fronds.",
    "Mosses grow in damp shaded places, on rocks, walls and tree bark.",
    "A lichen is a partnership between a fungus and an alga or a cyanobacterium.",
    "Most conifers keep their needles through the winter.",
    "Orchid seeds are as fine as dust and carried far by the wind.",
]


# ---------------------------------------------------------------- the code location, as defined

def expected_definitions() -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(assets, checks by asset, sensors and schedules) of the code location: what the UI must show."""
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assets = sorted(key.to_user_string() for key in graph.get_all_asset_keys())
    checks: dict[str, list[str]] = {}
    for key in graph.asset_check_keys:
        checks.setdefault(key.asset_key.to_user_string(), []).append(key.name)
    automations = sorted([s.name for s in defs.sensors or []] + [s.name for s in defs.schedules or []])
    return assets, {asset: sorted(names) for asset, names in sorted(checks.items())}, automations


# ---------------------------------------------------------------- the server

def _graphql(base: str, query: str) -> dict:
    """The webserver's GraphQL API: to know when it is up, and to confirm what the pages show."""
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def _wait_until_serving(dev: subprocess.Popen, base: str, log: Path) -> None:
    """Until the webserver answers and every daemon of the instance heart-beats."""
    query = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert dev.poll() is None, f"`vector-platform dev` exited ({dev.returncode}):\n{_tail(log)}"
        try:
            statuses = _graphql(base, query)["instance"]["daemonHealth"]["allDaemonStatuses"]
            if statuses and all(s["healthy"] for s in statuses):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, TypeError):
            pass  # not listening yet, or the daemon not started yet
        time.sleep(1)
    raise AssertionError(f"the webserver and daemon did not come up within 180 s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else "(no log)"


def _stop(dev: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to `dagster dev` alone, as a service manager sends it: it must take its webserver,
    daemon and code server down with it."""
    dev.send_signal(signal.SIGTERM)
    dev.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(dev.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    raise AssertionError("processes of `dagster dev` outlived it after SIGTERM")


def _backfill_outcome(base: str, backfill_id: str) -> tuple[str, list[str]]:
    """(status, status of each of its runs) of a backfill, from the instance."""
    data = _graphql(base, '{ partitionBackfillOrError(backfillId: "%s") { ... on PartitionBackfill { status '
                          "runs(limit: 100) { status } } } }" % backfill_id)["partitionBackfillOrError"]
    return data["status"], [run["status"] for run in data["runs"]]


def _wait_for_backfill(base: str, backfill_id: str) -> None:
    """Until the backfill ends; it must end with every run succeeded."""
    deadline = time.monotonic() + RUN_WAIT_S
    while time.monotonic() < deadline:
        status, runs = _backfill_outcome(base, backfill_id)
        if status not in ("REQUESTED", "CANCELING", "FAILING"):
            assert status == "COMPLETED_SUCCESS" and set(runs) == {"SUCCESS"}, (status, runs)
            return
        time.sleep(2)
    raise AssertionError(f"backfill {backfill_id} still {status} after {RUN_WAIT_S} s: runs {runs}")


# ---------------------------------------------------------------- the browser

class Screens:
    """Screenshots, numbered in the order they were taken."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0
        shutil.rmtree(folder, ignore_errors=True)  # no screenshot of an earlier run left to mislead
        folder.mkdir(parents=True)

    def take(self, page: Page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}_{name}.png"
        page.screenshot(path=str(path))
        return path


@pytest.fixture
def screens(tmp_path) -> Screens:
    root = os.environ.get("VP_TEST_ARTIFACTS")
    folder = Path(root) / "ui_browser" if root else tmp_path / "screenshots"
    print(f"browser screenshots: {folder}")
    return Screens(folder)


def _open_lineage(page: Page, base: str) -> None:
    """The global lineage graph, the navigation and the sidebar folded away, then every group
    opened (which lays the graph out again, to fit the room left). The browser remembers the
    navigation and the open groups, not the sidebar."""
    page.goto(f"{base}/asset-groups")
    expect(page.get_by_role("button", name="Materialize all")).to_be_visible()
    if page.get_by_role("button", name="Hide navigation").is_visible():
        page.get_by_role("button", name="Hide navigation").click()
    if page.get_by_placeholder("Jump to").is_visible():
        page.get_by_role("button").filter(has=page.get_by_role("img", name="panel_show_right")).click()
    for _ in range(2):  # (collapse, if open from last time, and) expand
        viewport = page.viewport_size
        page.mouse.click(viewport["width"] // 2, viewport["height"] - 60, button="right")  # the graph's own menu
        toggle = page.get_by_role("menuitem", name=re.compile("(Expand|Collapse) all groups"))
        expanding = "Expand" in toggle.inner_text()
        toggle.click()
        if expanding:
            return
    raise AssertionError("the lineage graph offered no 'Expand all groups'")


def _lineage_node(page: Page, asset: str):
    """An asset's node in the lineage graph (name, latest event, asset checks, partitions)."""
    return page.locator("div").filter(has=page.get_by_text(asset, exact=True)).filter(has_text="Asset checks").last


def _automation_row(page: Page, name: str):
    """The row of one sensor or schedule on the Automation page (its name, its on/off switch)."""
    return page.locator("div").filter(has=page.get_by_text(name, exact=True)).filter(has=page.get_by_role("checkbox")).last


def _launch_materialize_all(page: Page, base: str, collection: str):
    """Materialize all… and the collection's partition picked: the launch dialog, ready to launch."""
    page.goto(f"{base}/asset-groups")
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
    dialog.get_by_text("Select a partition or create one").click()
    picker = page.get_by_role("dialog").filter(has=page.get_by_placeholder("Filter partitions"))
    picker.get_by_placeholder("Filter partitions").fill(collection)
    picker.get_by_text(collection, exact=True).filter(visible=True).click()
    dialog.get_by_text("Launch runs to materialize").click()  # closes the picker, keeps the dialog
    expect(dialog.get_by_text(collection, exact=True).filter(visible=True)).to_be_visible()
    return dialog


def _check_passed(page: Page, base: str, asset: str, check: str) -> None:
    """One check on its asset's Checks tab: listed as succeeded, its latest evaluation passed."""
    page.goto(f"{base}/assets/{asset}?view=checks&checkDetail={check}")
    listed = page.locator("span").filter(has=page.get_by_title(check, exact=True)).first
    expect(listed).to_contain_text("Succeeded")
    latest = page.locator("div").filter(has=page.get_by_text("Evaluation result", exact=True)).filter(
        has=page.get_by_text("Timestamp", exact=True)).last
    expect(latest).to_contain_text("Passed")


# ---------------------------------------------------------------- the test

def test_dagster_ui_shows_the_code_location_materializes_by_clicks_and_shows_a_tier_move(
    pg_server, pg_dsn, tmp_path, unique_name, screens
):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`, as .ci/run does)")
    assets, checks, automations = expected_definitions()
    assert "no_chunk_lost" in checks["vector_table"] and "index_recall_meets_target" in checks["hnsw_index"]

    # A catalog database of its own: the launch dialog's model dimension lists every model the
    # catalog knows, and other tests register many (models not attached to this collection
    # would make the backfill's runs for those pairs fail).
    import psycopg
    from psycopg import sql

    catalog_db = f"ui_{unique_name[-6:]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(catalog_db)))
    _, env = instance_env(pg_server, pg_server.get_uri(database=catalog_db), tmp_path)  # the product's dagster.yaml
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dagster_dev.log"
    with log.open("wb") as out:
        dev = subprocess.Popen(cli("dev", "--port", str(port)), env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        _wait_until_serving(dev, base, log)
        source = write_jsonl(tmp_path / "plants.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(DOCS)])
        subprocess.run(cli("collections", "add", unique_name, "--source", str(source)), env=env, check=True, timeout=120)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1600, "height": 1000},
            )
            page = browser.new_page()
            page.set_default_timeout(UI_WAIT_MS)
            try:
                _walk_the_ui(page, base, env, unique_name, assets, checks, automations, screens)
            except BaseException:
                screens.take(page, "failure")
                print(f"`dagster dev` log:\n{_tail(log)}")
                raise
            finally:
                browser.close()
        _stop(dev)
        dev = None
    finally:
        if dev is not None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()


def _walk_the_ui(page: Page, base: str, env: dict, collection: str, assets: list[str], checks: dict[str, list[str]],
                 automations: list[str], screens: Screens) -> None:
    # Every sensor and schedule, switched on.
    page.goto(f"{base}/automation")
    for name in automations:
        expect(_automation_row(page, name).get_by_role("checkbox").nth(1)).to_be_checked()
    screens.take(page, "automation")

    # Every asset in the lineage graph.
    _open_lineage(page, base)
    for asset in assets:
        expect(page.get_by_text(asset, exact=True).filter(visible=True)).to_be_visible()
    screens.take(page, "lineage")

    # Materialize the collection by clicks: every asset, the collection's partition.
    dialog = _launch_materialize_all(page, base, collection)
    expect(dialog).to_contain_text(f"materialize {len(assets)} assets")
    screens.take(page, "launch_dialog")
    dialog.get_by_role("button", name="Launch backfill").click()
    toast = page.get_by_text(re.compile(r"Created backfill \w+"))
    backfill_id = re.search(r"Created backfill (\w+)", toast.inner_text()).group(1)
    page.get_by_role("link", name="View", exact=True).click()
    expect(page).to_have_url(re.compile(f"/runs/b/{backfill_id}"))
    _wait_for_backfill(base, backfill_id)
    page.reload()
    expect(page.get_by_text("100% completed")).to_have_count(len(assets), timeout=UI_WAIT_MS)
    screens.take(page, "backfill")

    # The lineage graph after it: every asset materialized, every check passed.
    page.set_viewport_size({"width": 1800, "height": 1100})  # room for nodes with their details
    _open_lineage(page, base)
    for asset in assets:
        expect(page.get_by_text(asset, exact=True).filter(visible=True)).to_be_visible()
    for asset, names in checks.items():
        expect(_lineage_node(page, asset)).to_contain_text(f"{len(names)} / {len(names)} Passed")
    lineage = screens.take(page, "lineage_materialized")
    if os.environ.get("VP_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(lineage, REPO / "docs" / "lineage-graph.png")
    page.set_viewport_size({"width": 1600, "height": 1000})

    # Every check of every asset, on its asset's Checks tab: passed.
    for asset, names in checks.items():
        for check in names:
            _check_passed(page, base, asset, check)
            screens.take(page, f"check_{check}")

    # A tier move submitted by the CLI to the running daemon, and its run in the UI.
    moved = subprocess.run(cli("tier", collection, "cold"), env=env, capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    submitted = re.search(r"run (\S+) submitted", moved.stdout)
    assert submitted, f"the move did not go to the running daemon: {moved.stdout}{moved.stderr}"
    run_id = submitted.group(1)
    page.goto(f"{base}/runs/{run_id}")
    expect(page.get_by_text("evict_job").first).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_WAIT_S * 1000)
    screens.take(page, "tier_move_run")
    listed = subprocess.run(cli("collections", "list", "--json"), env=env, capture_output=True, text=True, timeout=120)
    tiers = {c["name"]: c["tier"] for c in json.loads(listed.stdout)["collections"]}
    assert tiers[collection] == "cold"
