"""The inspector notebook in a real browser: JupyterLab + headless Debian chromium, driven by selenium.

Run with `make test-browser` (the `browser` marker is deselected in the default `make test`).
It starts JupyterLab on a free local port over a temporary copy of notebooks/05_inspector.ipynb
(parameters set to a small size of the reference model, the same save hook as `make lab`), runs it,
drags the lambda slider, picks another layer, clicks a segment on the image, and checks that the
figure and the widgets changed and that no error output appeared. At a 1400x900 window it checks the fit
(the sliders and the figure inside the visible notebook area together) and the colours (a segment's colour in
the segment panel is its colour in the labels panel, read from the canvas pixels). Screenshots go to
runs/browser-test/ (ignored by git). Server, kernel and browser are stopped by PID at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "runs" / "browser-test"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900"]  # the window
# Small enough for a 2-core CPU: each recompute is a fraction of a second.
PARAMETERS = dict(model="reference", images=["scene:100"], resolution=128, num_clusters=4, num_inference_steps=10,
                  modulation_timestep=201, max_batch=9, slider_timesteps=[201, 101], torch_threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[dict]:
    """JupyterLab on a free port over a temporary workspace holding the parameterised inspector notebook."""
    import nbformat

    from emerdiff.cli.app import jupyter_kernel

    assert jupyter_kernel("emerdiff") == "emerdiff", "the 'emerdiff' kernel is missing: run `make setup`"
    work = tmp_path_factory.mktemp("lab")
    nb = nbformat.read(ROOT / "notebooks" / "05_inspector.ipynb", as_version=4)
    # as papermill does: a cell after the tagged parameters cell overrides them
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    values = dict(PARAMETERS, output_dir=str(work / "figures"))
    nb.cells.insert(at, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    nbformat.write(nb, str(work / "05_inspector.ipynb"))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    # no "get notified about Jupyter news?" pop-up over the page
    (work / "config" / "labconfig").mkdir(parents=True)
    (work / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           f"--config={ROOT / 'notebooks' / 'jupyter_server_config.py'}",
           f"--LabApp.workspaces_dir={work / 'workspaces'}", f"--LabApp.user_settings_dir={work / 'settings'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
           "--ServerApp.port_retries=0", "--allow-root"]  # CI runs as root
    log = open(work / "server.log", "w")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def api(path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def up() -> bool:
        try:
            api("/api/status")
            return True
        except OSError:
            assert server.poll() is None, (work / "server.log").read_text()
            return False

    try:
        wait_for("JupyterLab to answer", up, timeout=90)
        yield dict(url=f"{base}/lab/tree/05_inspector.ipynb?token={token}", work=work, api=api)
    finally:
        try:
            for kernel in api("/api/kernels"):  # the kernel is the server's child: shut it down first
                api(f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """Headless Debian chromium through its chromedriver (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} missing: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    try:
        yield driver
    finally:
        driver.quit()
        try:  # chromedriver should be gone with quit(); make sure, by its PID
            os.kill(driver_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ page helpers
def wait_for_or_none(check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """Like :func:`wait_for`, but None instead of a failure on timeout."""
    try:
        return wait_for("", check, timeout, every)
    except AssertionError:
        return None


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def canvas_digest(driver: Any) -> str:
    """Hash of the pixels of the inspector's figure canvas (what the user sees of the figure)."""
    data = js(driver, """
        const c = document.querySelector('.jupyter-matplotlib-figure canvas');
        return c ? c.toDataURL('image/png') : null;""")
    assert data, "no ipympl canvas on the page"
    return hashlib.sha1(data.encode()).hexdigest()


def widget_select(driver: Any, label: str) -> Any:
    """The <select> of the ipywidgets Dropdown whose description is ``label``."""
    from selenium.webdriver.common.by import By

    for box in driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown"):
        if box.find_element(By.CSS_SELECTOR, "label").text.strip() == label:
            return box.find_element(By.TAG_NAME, "select")
    raise AssertionError(f"no dropdown labelled {label!r}")


def page_text(driver: Any, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def errors_on_page(driver: Any) -> list[str]:
    """Error and stderr outputs of the notebook, and the inspector's own error line."""
    bad = page_text(driver, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    bad += [t for t in page_text(driver, ".widget-html") if "error:" in t]
    return bad


def idle(driver: Any) -> bool:
    """The kernel is idle and the inspector's busy label says ready."""
    status = js(driver, """
        const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return k ? k.status : null;""")
    return status == "idle" and any(t.strip() == "ready" for t in page_text(driver, ".widget-html"))


def visible_area(driver: Any, element: Any) -> dict[str, float]:
    """The element's box and the box of the notebook area that shows it (scroll container within the window)."""
    return js(driver, """
        const el = arguments[0], r = el.getBoundingClientRect();
        // what a click at the element's centre would hit: the element itself unless something covers or clips it
        const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
        const own = el.closest('.jupyter-matplotlib-figure') || el;
        const box = (el.closest('.jp-WindowedPanel-outer') || el.closest('.jp-Notebook')).getBoundingClientRect();
        return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                area_top: Math.max(box.top, 0), area_bottom: Math.min(box.bottom, window.innerHeight),
                area_left: Math.max(box.left, 0), area_right: Math.min(box.right, window.innerWidth),
                window_height: window.innerHeight, on_top: !!hit && own.contains(hit),
                width: r.width, height: r.height};""", element)


def canvas_image(driver: Any) -> Any:
    """The figure canvas' pixels as an (H, W, 3) uint8 array."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    data = js(driver, "return document.querySelector('.jupyter-matplotlib-figure canvas').toDataURL('image/png');")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"))


def panel_pixels(pixels: Any, rect: tuple[float, float, float, float], n: int = 21) -> Any:
    """An n x n grid of pixel colours inside a panel given as a figure-fraction rect (inset by 5 %)."""
    import numpy as np

    h, w = pixels.shape[:2]
    left, bottom, width, height = rect
    fx = left + width * np.linspace(0.05, 0.95, n)
    fy = 1 - (bottom + height * np.linspace(0.95, 0.05, n))  # figure fractions count from the bottom
    return pixels[np.ix_((fy * h).astype(int), (fx * w).astype(int))].reshape(-1, 3)


def shot(driver: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


# ------------------------------------------------------------------ the test
def test_inspector_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(lab["url"])
    wait_for("the notebook and its kernel", lambda: js(d, """
        const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        return !!(w && w.content && w.content.widgets && w.sessionContext && w.sessionContext.session
                  && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle');"""),
             timeout=90)
    js(d, "window.jupyterapp.commands.execute('notebook:run-all-cells');")
    canvas = wait_for("the inspector's figure", lambda: d.find_elements(By.CSS_SELECTOR,
                                                                        ".jupyter-matplotlib-figure canvas"), 180)
    wait_for("every cell to run", lambda: idle(d) and all(
        p.strip() not in ("[*]:", "[ ]:") for p in page_text(d, ".jp-Cell.jp-CodeCell .jp-InputPrompt")), 180)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas[0])
    shot(d, "1_started")
    assert errors_on_page(d) == [], errors_on_page(d)

    # 0a. the fit: with the inspector scrolled to its top, each slider and the figure are in view together
    from emerdiff.notebook.inspector import panel_rects
    from emerdiff.viz import palette

    d.execute_script("arguments[0].closest('.widget-hbox').scrollIntoView({block: 'start'});", canvas[0])
    time.sleep(0.5)
    shot(d, "0_fit_1400x900")
    sliders = d.find_elements(By.CSS_SELECTOR, ".widget-slider")
    assert len(sliders) == 2  # lambda and t_m
    for element in [canvas[0], *sliders]:
        box = visible_area(d, element)
        assert box["window_height"] <= 900 and box["on_top"] and box["width"] > 100 and box["height"] > 10, box
        assert box["area_top"] - 1 <= box["top"] and box["bottom"] <= box["area_bottom"] + 1, box
        assert box["area_left"] - 1 <= box["left"] and box["right"] <= box["area_right"] + 1, box

    # 0b. the colours: at the same place in the segment panel and in the labels panel (the labels follow
    # the segments away from boundaries) the pixels are mostly the very same palette colour
    pixels = canvas_image(d)
    rects = panel_rects()
    seg_px, lab_px = panel_pixels(pixels, rects["image"]), panel_pixels(pixels, rects["labels"])
    pal = palette(PARAMETERS["num_clusters"])
    in_palette = (seg_px[:, None, :] == pal[None]).all(-1).any(-1)
    assert in_palette.mean() > 0.8, in_palette.mean()  # solid segment colours (black outline aside)
    same = (seg_px == lab_px).all(-1)
    assert same[in_palette].mean() > 0.6, same[in_palette].mean()
    start = canvas_digest(d)
    status0 = " ".join(page_text(d, ".widget-html"))

    # 1. drag the lambda slider's handle (a real pointer drag; the value is sent on release)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas[0])
    handle = d.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    ActionChains(d).click_and_hold(handle).move_by_offset(-25, 0).release().perform()
    dragged = time.monotonic()
    # the chosen segment's pair is drawn first, with the labels marked stale (screenshot it if caught) ...
    wait_for("the first redraw after the lambda drag", lambda: canvas_digest(d) != start, 90, every=0.05)
    print(f"lambda drag -> first redraw: {time.monotonic() - dragged:.2f} s")
    if any("stale" in t for t in page_text(d, ".widget-html")):
        shot(d, "2a_lambda_preview_stale")
    # ... then the other segments follow on the kernel's event loop and the labels turn current
    wait_for("the labels to catch up", lambda: idle(d) and any("labels: current" in t
                                                                for t in page_text(d, ".widget-html")), 90)
    print(f"lambda drag -> labels current: {time.monotonic() - dragged:.2f} s")
    readout = d.find_element(By.CSS_SELECTOR, ".widget-slider .widget-readout").text
    assert float(readout.replace("\u2212", "-")) < 10.0, readout  # left of the starting lambda 10
    after_lambda = canvas_digest(d)
    shot(d, "2_lambda_moved")

    # 2. pick another modulation layer
    layer = Select(widget_select(d, "layer"))
    first = layer.first_selected_option.text
    other = next(o.text for o in layer.options if o.text != first)
    layer.select_by_visible_text(other)
    # the busy label while the UNet runs (about a second here): screenshot it if caught, no assertion
    busy = wait_for_or_none(lambda: any("computing" in t for t in page_text(d, ".widget-html")), 5, every=0.05)
    if busy:
        shot(d, "3a_busy")
    wait_for("the recompute after the layer change", lambda: idle(d) and canvas_digest(d) != after_lambda, 90)
    assert Select(widget_select(d, "layer")).first_selected_option.text == other
    after_layer = canvas_digest(d)
    shot(d, "3_layer_picked")

    # 3. click segments on the image (top-left panel) until the chosen segment changes
    segment = Select(widget_select(d, "segment"))
    chosen = segment.first_selected_option.text
    canvas = d.find_element(By.CSS_SELECTOR, ".jupyter-matplotlib-figure canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    left, bottom, width, height = rects["image"]
    for px, py in [(0.15, 0.15), (0.85, 0.85), (0.15, 0.85), (0.85, 0.15), (0.5, 0.5)]:
        # offsets from the canvas centre to a point of the image panel (figure fractions from panel_rects)
        fx, fy = left + px * width, 1 - (bottom + (1 - py) * height)
        ActionChains(d).move_to_element_with_offset(canvas, int((fx - 0.5) * w), int((fy - 0.5) * h)).click().perform()
        time.sleep(1.0)
        if Select(widget_select(d, "segment")).first_selected_option.text != chosen:
            break
    wait_for("the redraw after the click", lambda: idle(d) and canvas_digest(d) != after_layer, 60)
    assert Select(widget_select(d, "segment")).first_selected_option.text != chosen
    shot(d, "4_segment_clicked")

    status1 = " ".join(page_text(d, ".widget-html"))
    assert status1 != status0  # the status line follows the segment and the cache
    assert errors_on_page(d) == [], errors_on_page(d)
    assert page_text(d, ".widget-output .jp-OutputArea-output") == []  # the inspector's error log is empty

    # saving keeps the notebook output-free and its outputs in executed/lab/ (the `make lab` hook)
    js(d, "window.jupyterapp.commands.execute('docmanager:save');")
    import nbformat

    from emerdiff.notebook.lab import LAB_COPIES, has_outputs

    kept = wait_for("the saved copy with outputs", lambda: (lab["work"] / LAB_COPIES / "05_inspector.ipynb").exists(), 30)
    assert kept
    assert not has_outputs(nbformat.read(lab["work"] / "05_inspector.ipynb", as_version=4))
    assert has_outputs(nbformat.read(lab["work"] / LAB_COPIES / "05_inspector.ipynb", as_version=4))
    shutil.copy(lab["work"] / "server.log", SHOTS / "server.log")
