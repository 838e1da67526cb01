"""The playground as a person meets it: JupyterLab on 127.0.0.1 with token auth, notebook 05 opened in headless
Chromium (Debian's chromium and chromedriver, driven by Selenium) at 1600x1000, Run All, then the widgets:

- Run All ends with the playground in view;
- the defaults' first Generate gives an image, and its condition fidelity is measured on the image the page shows
  (segmentation mIoU against the scene's exact layout) and passes the kit's threshold; the status says "done"
  only once that image is there, after "step k/n";
- a net trained on another kind of condition shows its warning in the unit, and it goes when a fitting net is
  chosen again;
- a settings string that is not JSON shows an error in its unit (and no stale preview), cleared when corrected;
- a ControlNet path where nothing is says "no ControlNet at PATH", and Generate then fails: the status says so
  (never "done") and the result pane is empty.

Screenshots are kept in reports/test-artifacts/ (playground.png: the window after the default Generate;
playground_panel.png: the playground alone). With CNKIT_DOCS_SCREENSHOT=1 the panel is also written to
docs/05_playground.png, the README's picture."""

import base64
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "05_multi_condition_playground.ipynb"
ARTIFACTS = ROOT / "reports" / "test-artifacts"
WINDOW = (1600, 1000)  # what a student's laptop shows


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
    # The kernel imports the kit from this checkout (the notebook's data/ paths resolve against it).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # No "get notified about Jupyter news?" toast over the playground.
    (tmp_path / "jupyter-config" / "labconfig").mkdir(parents=True)
    (tmp_path / "jupyter-config" / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
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


KERNEL_IDLE = ("const w = window.jupyterapp.shell.currentWidget;"
               "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
               " && w.sessionContext.session.kernel.status === 'idle');")
# Every text the status line shows, in order, with the number of result images on the page at that moment.
WATCH_STATUS = """
window.cnkitStatus = [];
const status = document.querySelector('.cnkit-status');
new MutationObserver(() => window.cnkitStatus.push(
    [status.textContent, document.querySelectorAll('img.cnkit-result').length]))
  .observe(status, {subtree: true, childList: true, characterData: true});
"""
# The pixels of an image as the page shows them (a blob: URL of the same origin), as a PNG data URL.
PIXELS = """
const img = arguments[0], c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
c.getContext('2d').drawImage(img, 0, 0);
return c.toDataURL('image/png');
"""


def _in_view(browser, element) -> bool:
    return browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return r.top >= 0 && r.bottom <= window.innerHeight && r.width > 0;", element)


def _page_image(browser, element) -> np.ndarray:
    from PIL import Image

    url = browser.execute_script(PIXELS, element)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def _select(unit, widget: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(unit.find_element(By.CSS_SELECTOR, f".cnkit-{widget} select")).select_by_visible_text(text)


def _type(unit, widget: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = unit.find_element(By.CSS_SELECTOR, f".cnkit-{widget} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.ENTER)  # the field is read when the user finishes: Enter (or leaving it)


@pytest.mark.slow
def test_the_playground_as_a_person_meets_it(jupyterlab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from cnkit import metrics
    from cnkit.data import splits, toyworld
    from cnkit.experiments.runs import THRESHOLDS

    url, token, folder = jupyterlab
    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wait, slow = WebDriverWait(browser, 180), WebDriverWait(browser, 300)
    text = lambda css: " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, css))
    try:
        # Without the token the server refuses: token auth is on.
        browser.get(f"{url}/api/contents")
        assert NOTEBOOK not in browser.page_source, "the server listed its files without the token"
        browser.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
        wait.until(lambda b: b.execute_script(
            "return !!(window.jupyterapp && document.querySelector('.jp-NotebookPanel'))"))
        wait.until(lambda b: b.execute_script(KERNEL_IDLE))  # the kernel is up
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        button = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".cnkit-generate")))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".cnkit-condition-image"))
        wait.until(lambda b: b.execute_script(KERNEL_IDLE))  # Run All has finished
        time.sleep(1)
        assert _in_view(browser, button), "Run All must end with the playground in view"

        # The defaults: a held-out shapes scene, its segmentation map, the net trained on segmentation maps.
        unit = browser.find_element(By.CSS_SELECTOR, ".cnkit-unit")
        assert "Unit 1" in unit.text and "shapes-segmentation" in unit.text
        assert not unit.find_elements(By.CSS_SELECTOR, ".cnkit-net-warning"), "the default net fits its unit"
        scene = toyworld.sample("shapes", splits.VALIDATION)
        prompt = browser.find_element(By.CSS_SELECTOR, ".cnkit-prompt input").get_attribute("value")
        assert prompt == scene.prompt, "the prompt starts as the scene's own"

        # The first Generate with the defaults: an image that follows its map, and a status that tells the truth.
        browser.execute_script(WATCH_STATUS)
        started = time.perf_counter()
        button.click()
        slow.until(lambda b: "done" in text(".cnkit-status") or "failed" in text(".cnkit-status"))
        seconds = time.perf_counter() - started
        assert "done" in text(".cnkit-status"), text(".cnkit-error")
        log = browser.execute_script("return window.cnkitStatus")
        said = [t for t, _ in log]
        assert any("loading the pipeline" in t for t in said), said
        assert any("step 20/20" in t for t in said), said
        first_done = next(k for k, t in enumerate(said) if "done" in t)
        assert all("step" in t or "loading" in t for t in said[:first_done]), said  # "done" comes last
        assert all("done" in t for t in said[first_done:]), said
        image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.cnkit-result"))
        assert len(image) == 1
        shown = _page_image(browser, image[0])
        step = shown.shape[0] // 64
        generated = shown[step // 2::step, step // 2::step]  # the 64 px image, shown enlarged without smoothing
        miou = metrics.segmentation_miou(generated, scene)
        assert miou >= THRESHOLDS["miou"], f"segmentation mIoU {miou:.3f} of the default Generate"
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", image[0])
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
        panel = browser.find_element(By.CSS_SELECTOR, ".cnkit-playground")
        browser.set_window_size(WINDOW[0], 1500)  # the whole panel, for the README
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", panel)
        panel.screenshot(str(ARTIFACTS / "playground_panel.png"))
        if os.environ.get("CNKIT_DOCS_SCREENSHOT") == "1":
            shutil.copy(ARTIFACTS / "playground_panel.png", ROOT / "docs" / "05_playground.png")
        browser.set_window_size(*WINDOW)
        print(f"default Generate: {seconds:.1f} s in the browser, segmentation mIoU {miou:.3f}")

        # A net trained on another kind of condition: the unit says so; a fitting one again: the warning goes.
        _select(unit, "net", "fill-outline")
        wait.until(lambda b: "trained on the fill world" in text(".cnkit-net-warning"))
        _select(unit, "net", "shapes-segmentation")
        wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, ".cnkit-net-warning"))

        # Settings that are not JSON: an error in the unit, no stale preview; corrected: both right again.
        _select(unit, "annotator", "canny")
        wait.until(lambda b: "low_threshold" in text(".cnkit-unit"))  # the keys it accepts are listed
        _type(unit, "settings", '{"low_threshold": 50')
        wait.until(lambda b: "not JSON" in text(".cnkit-unit-message"))
        assert not browser.find_element(By.CSS_SELECTOR, ".cnkit-condition-image").is_displayed()
        _type(unit, "settings", '{"low_threshold": 50}')
        wait.until(lambda b: not text(".cnkit-unit-message").strip())
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".cnkit-condition-image").is_displayed())
        assert "canny" in text(".cnkit-unit") and "trained on" in text(".cnkit-net-warning")  # no edge net ships

        # A path where no ControlNet is: named in the unit; Generate fails, says so, and shows no image.
        _select(unit, "annotator", "toy_segmentation")
        _select(unit, "net", "your own folder or file...")
        _type(unit, "net-path", "shapes-outline")
        wait.until(lambda b: "no ControlNet at shapes-outline" in text(".cnkit-net-message"))
        browser.execute_script(WATCH_STATUS)
        button.click()
        slow.until(lambda b: "failed" in text(".cnkit-status")
                   or any("done" in t for t, _ in b.execute_script("return window.cnkitStatus")))
        assert "failed" in text(".cnkit-status") and "no ControlNet at shapes-outline" in text(".cnkit-error")
        assert not browser.find_elements(By.CSS_SELECTOR, "img.cnkit-result"), "no stale image beside the error"
        assert not any("done" in t for t, _ in browser.execute_script("return window.cnkitStatus"))
        errors_elsewhere = text(".cnkit-unit-message")
        assert not errors_elsewhere.strip(), errors_elsewhere
    finally:
        browser.save_screenshot(str(ARTIFACTS / "playground_last.png"))
        browser.quit()
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
