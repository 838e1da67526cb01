"""The playground in a real JupyterLab in a real browser: start JupyterLab on 127.0.0.1 with token auth,
open notebook 05 in headless Chromium (Debian's chromium and chromedriver, driven by Selenium), run all
cells, click Generate, and check that a generated image appears. The screenshot is kept in
reports/test-artifacts/playground.png."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "05_multi_condition_playground.ipynb"
ARTIFACTS = ROOT / "reports" / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromedriver: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
    return chromium, driver


@pytest.fixture
def jupyterlab(tmp_path):
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)  # JupyterLab may save into its copy
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
        + (["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
    yield f"http://127.0.0.1:{port}", token, tmp_path
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.mark.slow
def test_playground_generates_in_jupyterlab_in_chromium(jupyterlab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, token, folder = jupyterlab
    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1400"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        # Without the token the server refuses: token auth is on.
        browser.get(f"{url}/api/contents")
        assert NOTEBOOK not in browser.page_source, "the server listed its files without the token"
        browser.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
        wait = WebDriverWait(browser, 180)
        wait.until(lambda b: b.execute_script(
            "return !!(window.jupyterapp && document.querySelector('.jp-NotebookPanel'))"))
        # The kernel must be up before running: wait until the notebook's session reports idle.
        wait.until(lambda b: b.execute_script(
            "const w = window.jupyterapp.shell.currentWidget;"
            "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.status === 'idle');"))
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        button = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".cnkit-generate")))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".cnkit-unit img"))  # the condition preview
        button.click()
        WebDriverWait(browser, 300).until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.cnkit-result"))
        image = browser.find_element(By.CSS_SELECTOR, "img.cnkit-result")
        browser.execute_script("arguments[0].scrollIntoView();", image)
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
        errors = browser.find_elements(By.CSS_SELECTOR, ".cnkit-error pre")
        assert not errors, errors[0].text
    finally:
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
        browser.quit()
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
