"""The browser demo driven as a person would: headless Chromium through selenium, against a real server process.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them with apt). Without them the test is
skipped with the reason, unless ``REGIONEMBED_REQUIRE_BROWSER=1`` (set by CI once it installed them): then it fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = (
        "BROWSER TEST SKIPPED: no chromium/chromedriver on PATH; install them with "
        "`apt-get install -y chromium chromium-driver` (what .ci/run does)"
    )
    if os.environ.get("REGIONEMBED_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """``python -m regionembed.demo --model tiny`` on a free loopback port, its files under a tmp folder."""
    _browser()
    out = tmp_path_factory.mktemp("demo_out")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("GRADIO_TEMP_DIR", None)
    log = open(out.parent / "demo_server.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "regionembed.demo", "--model", "tiny", "--port", str(port), "--output", str(out)]
    cwd = tmp_path_factory.mktemp("demo_cwd")  # must stay empty: the demo writes only into --output
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"the demo did not start: {(out.parent / 'demo_server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, out
    assert not any(cwd.iterdir()), f"the demo wrote into its working directory: {list(cwd.iterdir())}"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def driver():
    browser, chromedriver = _browser()
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium manager must not phone home
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,2400"):
        options.add_argument(arg)
    drv = webdriver.Chrome(options=options, service=Service(chromedriver))  # explicit driver: no download attempt
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _scene(tmp_path: Path) -> tuple[Path, dict[str, Path], Image.Image]:
    from regionembed.demo.core import synthetic_scene

    image, masks, names = synthetic_scene(0)
    image_path = tmp_path / "scene.png"
    image.save(image_path)
    paths = {}
    for mask, name in zip(masks, names, strict=True):
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.png"
        Image.fromarray(mask * 255).save(paths[name])
    return image_path, paths, image


def _status(drv, contains: str, timeout: float = 90) -> str:
    WebDriverWait(drv, timeout).until(lambda d: contains in d.find_element(By.ID, "status").text)
    return drv.find_element(By.ID, "status").text


def _upload(drv, elem_id: str, *paths: Path) -> None:
    drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys("\n".join(map(str, paths)))


def _type(drv, elem_id: str, text: str) -> None:
    box = drv.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(text)


def _table(drv, elem_id: str) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of a Dataframe as shown (Gradio renders its rows as ARIA grid rows)."""
    header = [c.get_attribute("title") for c in drv.find_elements(By.CSS_SELECTOR, f"#{elem_id} th[role=columnheader]")]
    rows = drv.find_elements(By.CSS_SELECTOR, f"#{elem_id} div[role=row]")
    body = [[c.text.strip() for c in r.find_elements(By.CSS_SELECTOR, "div[role=gridcell]")] for r in rows]
    return header, [r for r in body if any(r)]


def _paint(drv, image: Image.Image, centre: tuple[float, float]) -> None:
    """Drag the brush around ``centre`` (image pixels) on the editor's canvas."""
    drv.find_element(By.CSS_SELECTOR, "#editor button[aria-label='Brush']").click()
    canvas = drv.find_elements(By.CSS_SELECTOR, "#editor canvas")[-1]
    # the editor shows the image centred in the canvas at the zoom it prints (e.g. "186%")
    zoom = float(drv.find_element(By.ID, "editor").text.split("%")[0].split()[-1]) / 100
    dx = (centre[0] - image.width / 2) * zoom
    dy = (centre[1] - image.height / 2) * zoom
    chain = ActionChains(drv).move_to_element_with_offset(canvas, int(dx), int(dy)).click_and_hold()
    for step in range(8):
        chain = chain.move_by_offset(3 if step % 2 else -3, 2)
    chain.release().perform()


def _preview_src(drv) -> str | None:
    return drv.find_element(By.CSS_SELECTOR, "#box_picker img").get_attribute("src")


def _click_box(drv, first: tuple[int, int], second: tuple[int, int]) -> None:
    """Click two corners (image pixels) on the box preview."""
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#box_picker img"))
    img = drv.find_element(By.CSS_SELECTOR, "#box_picker img")
    natural = drv.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    rect = img.rect
    for x, y in (first, second):
        # Gradio shows the image centred, never enlarged: scale min(box / natural, 1)
        scale = min(rect["width"] / natural[0], rect["height"] / natural[1], 1)
        dx = (x + 0.5 - natural[0] / 2) * scale
        dy = (y + 0.5 - natural[1] / 2) * scale
        src = img.get_attribute("src")
        ActionChains(drv).move_to_element_with_offset(img, round(dx), round(dy)).click().perform()
        # each click comes back as a new preview (corner marked, then the box drawn)
        WebDriverWait(drv, 30).until(lambda d, old=src: _preview_src(d) != old)
        img = drv.find_element(By.CSS_SELECTOR, "#box_picker img")


def test_demo_in_a_browser(demo_url, driver, tmp_path):
    url, out = demo_url
    image_path, masks, image = _scene(tmp_path)
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "run"))

    # bad input 1: a file that is not an image, shown in the page with the CLI's message
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    _upload(driver, "image_file", junk)
    assert "cannot read image" in _status(driver, "Error")
    assert "notes.png" in driver.find_element(By.ID, "status").text

    # bad input 2: a weights file that does not exist, refused when the model loads
    driver.find_element(By.XPATH, "//*[@id='model_kind']//label[contains(., 'open_clip model')]").click()
    _type(driver, "model_name", "re-tiny-vit")
    _type(driver, "model_weights", str(tmp_path / "missing.safetensors"))
    driver.find_element(By.ID, "load_model").click()
    WebDriverWait(driver, 60).until(lambda d: "not found" in d.find_element(By.ID, "model_info").text)
    assert "missing.safetensors" in driver.find_element(By.ID, "model_info").text
    driver.find_element(By.XPATH, "//*[@id='model_kind']//label[contains(., 'Tiny random')]").click()
    WebDriverWait(driver, 60).until(lambda d: "Random weights" in d.find_element(By.ID, "model_info").text)

    _upload(driver, "image_file", image_path)
    _status(driver, "loaded (192x192)")
    driver.find_element(By.CSS_SELECTOR, "#image_file button[aria-label='Clear']").click()

    # two regions painted with the brush, one layer each (yellow circle, purple cross), one uploaded mask, one box
    yellow = np.argwhere(np.asarray(Image.open(masks["yellow circle"])) > 0).mean(0)  # (row, col)
    cross = np.argwhere(np.asarray(Image.open(masks["purple cross"])) > 0).mean(0)
    _paint(driver, image, (float(yellow[1]), float(yellow[0])))
    driver.find_element(By.CSS_SELECTOR, "#editor button[aria-label='Show Layers']").click()
    driver.find_element(By.CSS_SELECTOR, "#editor button[aria-label='Add Layer']").click()
    _paint(driver, image, (float(cross[1]), float(cross[0])))

    # bad input 3: a mask of another size, refused like the CLI refuses it; the page keeps working afterwards
    small = tmp_path / "small.png"
    Image.fromarray(np.full((40, 50), 255, np.uint8)).save(small)
    _upload(driver, "mask_files", small)
    _type(driver, "prompts", "yellow circle\nblue circle\ngreen star")
    time.sleep(1)
    driver.find_element(By.ID, "run").click()
    error = _status(driver, "Error")
    assert "is 50x40 but its image is 192x192" in error, error

    driver.find_element(By.CSS_SELECTOR, "#mask_files button[aria-label='Clear']").click()
    _upload(driver, "mask_files", masks["blue circle"])
    _click_box(driver, (8, 150), (40, 182))  # on the preview, as a person draws a box
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute("value"))
    box = [int(v) for v in driver.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute("value").split()]
    assert np.abs(np.subtract(box, [8, 150, 41, 183])).max() <= 1, box
    time.sleep(1)
    driver.find_element(By.ID, "run").click()
    done = _status(driver, "Done")
    assert "Random weights" in done  # the tiny model is labelled as random
    driver.save_screenshot(str(tmp_path / "demo_done.png"))

    header, body = _table(driver, "probabilities")
    assert header[:2] == ["region", "best prompt"]
    assert header[2:] == ["yellow circle", "blue circle", "green star"]
    assert [r[0] for r in body] == ["brush_1", "brush_2", "blue_circle", "box_1"]
    for row in body:
        probs = [float(v) for v in row[2:]]
        assert abs(sum(probs) - 1) < 2e-3, row
        assert row[1] == header[2 + int(np.argmax(probs))]

    # the overlay of the painted region: the image under a heat map, the mask outlined in white
    src = driver.find_elements(By.CSS_SELECTOR, "#overlays img")[0].get_attribute("src")
    with urllib.request.urlopen(src, timeout=10) as resp:
        overlay = np.asarray(Image.open(io.BytesIO(resp.read())).convert("RGB"))
    assert overlay.shape == (192, 192, 3)
    assert overlay.std() > 10
    white = (overlay == 255).all(-1)
    assert 0 < white.mean() < 0.2  # the outline: some pixels, not the whole image

    _, methods = _table(driver, "methods_table")
    assert {"global", "crop", "mask_inversion"} <= {r[1] for r in methods}
    assert "regionembed-infer single" in driver.find_element(By.ID, "command").text
    # the embeddings download: the CLI's safetensors format, one row per region in the table's order
    link = next(
        a.get_attribute("href")
        for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a")
        if "embeddings" in (a.get_attribute("href") or "")
    )
    with urllib.request.urlopen(link, timeout=10) as resp:
        (tmp_path / "downloaded.safetensors").write_bytes(resp.read())
    with safe_open(tmp_path / "downloaded.safetensors", "pt") as fh:
        assert json.loads(fh.metadata()["mask_names"]) == ["brush_1", "brush_2", "blue_circle", "box_1"]
        assert fh.get_tensor("embeddings").shape[0] == 4
        assert tuple(fh.get_tensor("maps").shape) == (4, 192, 192)

    # the server's files are in its output folder, Gradio's upload cache included
    assert any((out / "gradio").rglob("scene.png"))
    runs = sorted(out.glob("run-*/outputs/image/manifest.json"))
    assert runs, list(out.iterdir())
    for name, centre in (("brush_1", yellow), ("brush_2", cross)):  # each stroke landed where it was drawn
        painted = np.asarray(Image.open(runs[-1].parents[2] / "inputs" / "masks" / f"{name}.png"))
        assert painted.shape == (192, 192) and painted.max() == 255
        assert np.abs(np.argwhere(painted > 0).mean(0) - centre).max() < 15, name
