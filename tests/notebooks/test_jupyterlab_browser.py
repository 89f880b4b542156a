"""JupyterLab tried in a real browser: the server `make lab` starts (on a free port, with a token, rooted in a
temporary folder), headless Chromium (the system's: Debian's `chromium` package), notebook 00 run there on the
project's kernel and its report read from the page; then notebook 90 on synthetic runs, whose screenshot is the
README's (set COOKBOOK_SCREENSHOT=docs/notebook-90-jupyterlab.png to write it).

The browser is driven with playwright's Python package and the system Chromium; `playwright install` (a browser
download of its own) is never needed. A missing Chromium or playwright fails the test and says how to install it.
"""
import contextlib
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from cookbook.analysis.examples import write_example_runs
from cookbook.runner import KERNEL_NAME, notebooks_dir

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("COOKBOOK_CHROMIUM", "/usr/bin/chromium")
# playwright's launch() gives Chromium a fresh temporary --user-data-dir of its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
OK_COLOR = "rgb(217, 242, 217)"  # notebook 00 paints "ok" status cells #d9f2d9


def _require_browser():
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: this test drives the system's headless Chromium. Install it with "
                    "`apt-get install -y chromium` (Debian, as root; .ci/run does this) or point COOKBOOK_CHROMIUM "
                    "at a Chromium binary.", pytrace=False)
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("the Python package playwright is missing: `make env` installs it (env/requirements-cpu.txt). "
                    "Do not run `playwright install`: the test uses the system Chromium.", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parameterized(name: str, root: Path, params: dict) -> str:
    """A copy of notebook ``name`` in the server's root with ``params`` injected, as papermill injects them."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(notebooks_dir() / f"{name}.ipynb")), params,
                               kernel_name=KERNEL_NAME)
    nbformat.write(nb, root / f"{name}.ipynb")
    return f"{name}.ipynb"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token, root folder) of a JupyterLab server started as `make lab` starts it."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    root, state = tmp / "root", tmp / "state"
    root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).with_name("jupyter")
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"), "JUPYTER_RUNTIME_DIR": str(state / "runtime")}
    news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no "get news?" toast
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(
        [str(jupyter), "lab", f"--notebook-dir={root}", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(tmp / 'lab.log').read_text()[-3000:]}", pytrace=False)
            time.sleep(0.5)
        yield base, token, root
    finally:
        with contextlib.suppress(OSError):  # shuts the kernels down, then the server
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"),
                                   timeout=10)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1360, "height": 1250})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _api(base: str, token: str, path: str):
    with urllib.request.urlopen(f"{base}{path}?token={token}", timeout=10) as r:
        return json.load(r)


def _wait_for_kernel(base: str, token: str, notebook: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions = [s for s in _api(base, token, "/api/sessions") if s["path"] == notebook]
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
            assert sessions[0]["kernel"]["name"] == KERNEL_NAME, sessions[0]["kernel"]
            return
        time.sleep(0.3)
    pytest.fail(f"no idle kernel for {notebook} after {timeout:.0f} s: {_api(base, token, '/api/sessions')}",
                pytrace=False)


def _run_all(page, base: str, token: str, notebook: str):
    """Open ``notebook`` in JupyterLab, run all cells on its kernel, wait until every code cell has run."""
    page.goto(f"{base}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?token={token}")  # only this one open
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.wait_for()
    _wait_for_kernel(base, token, notebook)  # the toolbar says "idle" before a kernel exists: ask the server
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    current = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    prompts = f"{current} .jp-CodeCell .jp-InputPrompt"
    try:
        page.wait_for_function(
            f"""() => {{ const p = [...document.querySelectorAll('{prompts}')];
                         return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }}""",
            timeout=90_000)
    except Exception:
        shot = Path(os.environ.get("TMPDIR", "/tmp")) / f"lab-{notebook}.png"
        page.screenshot(path=str(shot))
        pytest.fail(f"{notebook} did not finish in JupyterLab; prompts {page.locator(prompts).all_inner_texts()}, "
                    f"screenshot {shot}", pytrace=False)
    kernel = panel.locator(".jp-Toolbar-kernelName").inner_text()
    assert kernel == "Python (grpo-cookbook)", kernel
    errors = panel.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not errors, errors
    return panel


def test_notebook_00_runs_in_jupyterlab(lab, page):
    base, token, root = lab
    name = _parameterized("00_environment", root, {"runs_dir": str(root.parent / "runs"), "run_name": "lab"})
    nb = _run_all(page, base, token, name)
    status = nb.locator(".jp-RenderedHTMLCommon table td").filter(has_text="ok")
    assert status.count() > 0
    assert status.first.evaluate("e => getComputedStyle(e).backgroundColor") == OK_COLOR
    cells = nb.locator(".jp-RenderedHTMLCommon table td").all_inner_texts()
    assert "fail" not in cells
    assert "overall: " in nb.locator(".jp-OutputArea-output").last.inner_text()
    report = json.loads((root.parent / "runs" / "lab" / "env_report.json").read_text())
    assert report["preset"] == "tiny"


def test_notebook_90_renders_in_jupyterlab(lab, page, tmp_path):
    base, token, root = lab
    runs = write_example_runs(root.parent / "runs")
    name = _parameterized("90_analysis", root, {"runs": [str(p) for p in runs],
                                                "out_dir": str(root.parent / "report")})
    nb = _run_all(page, base, token, name)
    images = nb.locator(".jp-RenderedImage img")
    assert images.count() == 4  # training, mismatch, routing, study
    assert (root.parent / "report" / "summary.csv").is_file()
    page.keyboard.press("Control+b")  # the file browser closed: the notebook gets the width
    nb.locator(".jp-CodeCell", has_text='rep.show("routing")').first.evaluate(
        "e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    shot = tmp_path / "notebook-90.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("COOKBOOK_SCREENSHOT"):  # the README's picture: a palette PNG, small enough for the repo
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(colors=128).save(os.environ["COOKBOOK_SCREENSHOT"], optimize=True)
