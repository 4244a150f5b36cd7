"""The committed notebooks in a real browser: JupyterLab driven through Debian's headless Chromium.

For every notebook (``notebooks/[0-9][0-9]_*.ipynb``) this opens it in JupyterLab as a user would
after ``make lab`` and checks that

- opening it changes nothing (the notebook is not marked modified),
- every committed figure (``img`` output) renders with a non-zero size,
- every committed widget renders from the saved widget state: no "Error displaying widget", no
  "model not found", no ``interactive(children=...`` text fallback,
- the kernel starts; then it runs the cells tagged ``explorer-setup`` and the cell tagged ``explorer``
  (docs/DEVELOPING.md, "Explorers"), changes every dropdown, slider and checkbox of the explorer and
  checks that the explorer's output changes each time, with no error in any of those cells.

Screenshots go to ``$FEDLIB_TEST_OUTPUT/browser/<notebook>/`` (default ``.test-output/``). The test
works on a copy of the notebooks in a temporary folder, with its own Jupyter config, data, settings
and workspace folders, and its kernels get an empty ``$FEDLIB_RUN_DIR`` and ``$FEDLIB_FIGURES_DIR``
(so explorers read the committed ``results/quick/<notebook>/`` data): the repository and the user's
Jupyter set-up are never written.

Needs Playwright (PyPI, in the ``test`` extra) and Chromium at ``$FEDLIB_CHROMIUM`` (default
``/usr/bin/chromium``; ``scripts/install_browser.sh``, run by ``make venv``, installs Debian's). Without
them the test is skipped with the reason, except under CI (``FEDLIB_CI=1``, set by ``.ci/run``), where
that is a failure. ``FEDLIB_BROWSER_NOTEBOOKS=<folder>`` tests the notebooks of another folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("FEDLIB_BROWSER_NOTEBOOKS") or REPO / "notebooks").resolve()
OUTPUT = Path(os.environ.get("FEDLIB_TEST_OUTPUT") or REPO / ".test-output").resolve() / "browser"
CHROMIUM = os.environ.get("FEDLIB_CHROMIUM") or "/usr/bin/chromium"
CI = os.environ.get("FEDLIB_CI") == "1"
# The flags this machine needs (docs of the machine: Chromium's background connections are refused).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
BROKEN_WIDGET = ("Error displaying widget", "interactive(children=", "odel not found")
SETUP_TAG, EXPLORER_TAG = "explorer-setup", "explorer"
OPEN_TIMEOUT_S = 90
CELL_TIMEOUT_S = 120
CHANGE_TIMEOUT_S = 30
JUPYTER = Path(sys.executable).parent / "jupyter"

NOTEBOOKS = sorted(SOURCE.glob("[0-9][0-9]_*.ipynb"))


def unavailable(reason: str):
    if CI:
        pytest.fail(f"{reason} (FEDLIB_CI=1: the browser test must run in CI)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracked_state() -> str:
    """git's view of the tracked notebooks and figures (compared before and after the test)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "notebooks", "figures"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def write_setting(settings_dir: Path, plugin: str, values: dict) -> None:
    package, name = plugin.split(":")
    path = settings_dir / package / f"{name}.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


class Lab:
    """A JupyterLab server on 127.0.0.1 serving a copy of the notebooks, isolated from the user's set-up."""

    def __init__(self, root: Path):
        self.home = root
        self.root = root / "repo"
        shutil.copytree(SOURCE, self.root / "notebooks",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "MPLBACKEND"))}
        # MPLBACKEND=Agg (set by `make test`) would keep the kernel's figures from showing inline.
        for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
            self.env[var] = str(root / sub)
        # A run folder of its own: the kernels read explorer data from $FEDLIB_RUN_DIR before the
        # committed results/quick/, and `make test` points that variable at the folder nbval's runs of
        # every notebook write into at the same time.
        self.env["FEDLIB_RUN_DIR"] = str(root / "run")
        self.env["FEDLIB_FIGURES_DIR"] = str(root / "figures")
        settings = root / "settings"
        # Test-only user settings: every cell in the DOM (no virtual scrolling), no news pop-up.
        # The widget settings are left alone: they come from the environment's overrides.json.
        write_setting(settings, "@jupyterlab/notebook-extension:tracker", {"windowingMode": "none"})
        write_setting(settings, "@jupyterlab/apputils-extension:notification",
                      {"fetchNews": "false", "checkForUpdates": False})
        # what `make lab` does before starting Lab: trust the committed notebooks (signatures go to
        # JUPYTER_DATA_DIR, here a temporary folder)
        subprocess.run([str(JUPYTER), "trust", "--log-level=WARN",
                        *map(str, sorted((self.root / "notebooks").glob("[0-9][0-9]_*.ipynb")))],
                       env=self.env, check=True, capture_output=True, timeout=120)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "jupyterlab.log"
        args = [str(JUPYTER), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root}", "--LabApp.extension_manager=readonly"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.time() + OPEN_TIMEOUT_S
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not start; its log:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.3)

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        with opener.open(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def url(self, notebook: str, workspace: str) -> str:
        return f"{self.base}/lab/workspaces/{workspace}/tree/notebooks/{notebook}?token={self.token}&reset"

    def shutdown_sessions(self) -> None:
        for session in self.api("GET", "/api/sessions") or []:
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def tracked_before():
    return tracked_state()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tracked_before):
    if not JUPYTER.exists() or not (JUPYTER.parent / "jupyter-lab").exists():
        unavailable(f"JupyterLab is not installed beside {sys.executable} (make venv installs it)")
    server = Lab(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright is not installed (make venv installs it from the test extra)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh (make venv does) or set FEDLIB_CHROMIUM")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(OPEN_TIMEOUT_S * 1000)
        yield context
        context.close()


# ---------------------------------------------------------------------------------------------
# helpers on the page


def committed(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    for i, t in enumerate(tags):
        if (SETUP_TAG in t or EXPLORER_TAG in t) and nb.cells[i].cell_type != "code":
            raise AssertionError(f"{path.name}: cell {i} is tagged {t} but is not a code cell")
    return {
        "cells": len(nb.cells),
        "setup": [i for i, t in enumerate(tags) if SETUP_TAG in t],
        "explorer": [i for i, t in enumerate(tags) if EXPLORER_TAG in t],
        "images": sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {}) for o in outputs),
        "widgets": sum(WIDGET_VIEW in o.get("data", {}) for o in outputs),
        "python": nb.metadata.get("language_info", {}).get("version"),
    }


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def kernel_status(page) -> str | None:
    return page.evaluate("() => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                         ".jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') ?? null")


def kernel_ready(page, lab: Lab) -> bool:
    """The notebook's kernel is connected to the page and idle, by the server's account and the page's
    (the page's indicator alone reads idle before a kernel is there)."""
    kernels = [s["kernel"] for s in lab.api("GET", "/api/sessions") or [] if s.get("kernel")]
    return (len(kernels) == 1 and kernels[0].get("execution_state") == "idle"
            and kernels[0].get("connections", 0) >= 1 and kernel_status(page) == "idle")


def notebook_text(page) -> str:
    return page.locator(".jp-NotebookPanel .jp-Notebook").inner_text()


def broken_widgets(text: str) -> list[str]:
    return [marker for marker in BROKEN_WIDGET if marker in text]


def image_sizes(page) -> list[dict]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img'))
        .map(img => { const r = img.getBoundingClientRect();
                      return {complete: img.complete, natural: img.naturalWidth, width: r.width, height: r.height}; })""")


def rendered_widgets(page) -> int:
    """Widget views Lab rendered (an untrusted or unrendered one is text/plain instead)."""
    return page.locator(".jp-Notebook .jp-Cell > .jp-Cell-outputWrapper .jp-OutputArea-output > .jupyter-widgets").count()


def run_cell(page, cell, order: int) -> None:
    """Run one cell as a user does (click into it, Ctrl+Enter) and wait for its prompt to read [order]."""
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")
    prompt = cell.locator(".jp-InputArea-prompt")
    wait_until(lambda: prompt.inner_text().strip() == f"[{order}]:" and kernel_status(page) == "idle",
               CELL_TIMEOUT_S, f"cell to finish as execution [{order}] (prompt {prompt.inner_text()!r})")
    text = cell.locator(".jp-Cell-outputArea").inner_text()
    assert "Traceback (most recent call last)" not in text, f"the cell raised:\n{text[-2000:]}"


def output_signature(output) -> str:
    """What the reader sees in the explorer's output: its text and its images (not the DOM, which
    differs between two renderings of the same output)."""
    if not output.count():
        return ""
    seen = output.evaluate("el => el.innerText + '\\n' + Array.from(el.querySelectorAll('img')).map(i => i.src).join('\\n')")
    return hashlib.sha1(seen.encode()).hexdigest() if seen.strip() else ""


def settled_change(page, output, before: str) -> bool:
    """True once the explorer's output differs from ``before`` with the kernel idle, twice in a row."""
    deadline, last = time.time() + CHANGE_TIMEOUT_S, None
    while time.time() < deadline:
        sig = output_signature(output)
        busy = kernel_status(page) != "idle"
        if sig and sig != before and not busy and sig == last:
            return True
        last = None if busy else sig
        time.sleep(0.4)
    return False


def change_controls(page, box, output) -> list[str]:
    """Change each dropdown, slider and checkbox of an interactive box; the output must change each time."""
    done = []
    selects = box.locator("select")
    for i in range(selects.count()):
        select = selects.nth(i)
        options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
        current = select.input_value()
        before = output_signature(output)
        tried = []
        for value in [v for v in options if v != current][:3]:
            select.select_option(value)
            tried.append(value)
            if settled_change(page, output, before):
                break
        else:
            raise AssertionError(f"dropdown {i} ({options}): the explorer's output did not change for {tried}")
        done.append(f"dropdown {i}: {current} -> {tried[-1]}")
    sliders = box.locator(".widget-slider")
    for i in range(sliders.count()):
        handle = sliders.nth(i).locator(".noUi-handle").first
        low, now = handle.get_attribute("aria-valuemin"), handle.get_attribute("aria-valuenow")
        before = output_signature(output)
        handle.focus()  # the slider's own keyboard: Home and End jump to its ends
        page.keyboard.press("Home" if float(now) != float(low) else "End")
        assert settled_change(page, output, before), f"slider {i}: the explorer's output did not change (from {now})"
        done.append(f"slider {i}: {now} -> {handle.get_attribute('aria-valuenow')}")
    boxes = box.locator("input[type=checkbox]")
    for i in range(boxes.count()):
        before = output_signature(output)
        boxes.nth(i).click()
        assert settled_change(page, output, before), f"checkbox {i}: the explorer's output did not change"
        done.append(f"checkbox {i}")
    assert done, "the explorer has no dropdown, slider or checkbox to change"
    return done


# ---------------------------------------------------------------------------------------------
# tests


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks matching [0-9][0-9]_*.ipynb in {SOURCE}"


def test_lab_serves_the_project_widget_settings(lab):
    """The environment's overrides.json (scripts/install_jupyter_settings.py) is what Lab serves."""
    plugin = lab.api("GET", "/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin")
    assert plugin["settings"].get("saveState", plugin["schema"]["properties"]["saveState"]["default"]) is False
    spec = lab.api("GET", "/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    names = {nbformat.read(p, as_version=4).metadata.get("kernelspec", {}).get("display_name") for p in NOTEBOOKS}
    assert names == {spec["display_name"]}, (
        f"Lab's python3 kernel is called {spec['display_name']!r} but the notebooks say {names}: Lab would rewrite "
        "metadata.kernelspec on open (make venv runs scripts/install_jupyter_settings.py)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_jupyterlab(path, browser, lab):
    name = path.name
    facts = committed(path)
    shots = OUTPUT / path.stem
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    page = browser.new_page()
    page_errors = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    started = time.time()
    try:
        page.goto(lab.url(name, path.stem.replace("_", "-")))
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell")
        cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
        wait_until(lambda: cells.count() == facts["cells"], OPEN_TIMEOUT_S,
                   f"{facts['cells']} cells (see {lab.log_path})")
        wait_until(lambda: kernel_ready(page, lab), OPEN_TIMEOUT_S, "the kernel to start and connect")
        # every committed widget view rendered from the saved state, every image loaded
        try:
            wait_until(lambda: rendered_widgets(page) >= facts["widgets"] and "Loading widget" not in notebook_text(page),
                       OPEN_TIMEOUT_S, f"{facts['widgets']} committed widgets to render")
        except AssertionError as err:
            raise AssertionError(f"{err}: {rendered_widgets(page)} rendered, shown instead: "
                                 f"{broken_widgets(notebook_text(page))} (a notebook Lab does not trust shows its "
                                 "widgets as text; `make lab` runs jupyter trust)") from None
        wait_until(lambda: all(s["complete"] for s in image_sizes(page)), OPEN_TIMEOUT_S, "images to load")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "1-opened.png"))
        opened = time.time()

        text = notebook_text(page)
        assert not broken_widgets(text), f"widgets fall back or fail: {broken_widgets(text)}"
        sizes = image_sizes(page)
        assert len(sizes) >= facts["images"], f"{len(sizes)} images rendered, {facts['images']} committed"
        assert all(s["natural"] > 0 and s["width"] > 0 and s["height"] > 0 for s in sizes), f"empty images: {sizes}"
        assert rendered_widgets(page) == facts["widgets"], f"{rendered_widgets(page)} widgets, {facts['widgets']} committed"
        wait_until(lambda: kernel_ready(page, lab), OPEN_TIMEOUT_S, "the kernel to be idle")
        # Opening must change nothing. Lab does write the running kernel's language_info into the
        # notebook, so a kernel on another Python than the one that executed it marks it modified.
        if facts["python"] == platform.python_version():
            dirty = page.locator(".jp-NotebookPanel .jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty").count()
            assert dirty == 0, "opening the notebook marked it modified"

        # the explorer: its set-up cells and itself, in a fresh kernel
        assert facts["explorer"], (f"{name} has no cell tagged {EXPLORER_TAG!r}: every notebook needs an explorer "
                                   "(docs/DEVELOPING.md, Explorers)")
        assert len(facts["explorer"]) == 1, f"{name}: more than one cell tagged {EXPLORER_TAG!r}"
        explorer = facts["explorer"][0]
        assert all(i < explorer for i in facts["setup"]), f"{name}: a cell tagged {SETUP_TAG!r} follows the explorer"
        explorer_cell = cells.nth(explorer)
        shown = explorer_cell.locator(".jp-Cell-outputWrapper")
        if explorer_cell.locator(".widget-interact").count():
            shown.screenshot(path=str(shots / "2-explorer-committed.png"))
        for order, index in enumerate([*facts["setup"], explorer], start=1):
            run_cell(page, cells.nth(index), order)
        box = explorer_cell.locator(".jp-Cell-outputArea .widget-interact").first
        box.wait_for(state="visible", timeout=CELL_TIMEOUT_S * 1000)
        output = box.locator(":scope > .widget-output").last
        wait_until(lambda: output_signature(output), CELL_TIMEOUT_S, "the explorer's first output")
        assert not broken_widgets(explorer_cell.inner_text())
        shown.screenshot(path=str(shots / "3-explorer-ran.png"))
        ran = time.time()
        changes = change_controls(page, box, output)
        shown.screenshot(path=str(shots / "4-explorer-changed.png"))
        assert "Traceback (most recent call last)" not in output.inner_text()
        wait_until(lambda: kernel_ready(page, lab), CELL_TIMEOUT_S, "the kernel to be idle after the explorer")
        (shots / "log.txt").write_text(
            f"{name}: {time.time() - started:.1f} s (open and render {opened - started:.1f} s, explorer set-up and "
            f"first view {ran - opened:.1f} s, {len(changes)} control changes {time.time() - ran:.1f} s)\n"
            + "\n".join(changes) + "\n" + "".join(f"page error: {e}\n" for e in page_errors))
    except BaseException:
        page.screenshot(path=str(shots / "failure.png"))
        raise
    finally:
        page.close()
        lab.shutdown_sessions()


def test_no_tracked_file_changed(tracked_before):
    """Nothing above wrote into the repository's tracked notebooks or figures."""
    assert tracked_state() == tracked_before
