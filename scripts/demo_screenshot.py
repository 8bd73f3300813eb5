"""The README's screenshot of the browser demo, made the way the browser test drives it.

Starts ``python -m regionembed.demo`` on a free loopback port, opens it in headless Chromium (Debian's ``chromium``
and ``chromium-driver``), presses "New synthetic scene", picks the explainer, runs, and saves the page:

    python scripts/demo_screenshot.py --model tiny --out docs/demo.png
    python scripts/demo_screenshot.py --model synthetic --explainer VL-Score --out docs/demo.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("synthetic", "tiny"), default="tiny")
    parser.add_argument("--scene", type=int, default=3, help="synthetic scene index")
    parser.add_argument("--explainer", default="LeGrad", help="LeGrad, Grad-CAM, Score-CAM or VL-Score")
    parser.add_argument("--out", default="docs/demo.png")
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="regionembed-screenshot-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "regionembed.demo", "--model", args.model, "--port", str(port), "--output", str(work)]
    server = subprocess.Popen(cmd, cwd=work, env=env)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = Options()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,2500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "new_scene"))
        scene = driver.find_element(By.CSS_SELECTOR, "#scene_index input")
        scene.clear()
        scene.send_keys(str(args.scene))
        driver.find_element(By.ID, "new_scene").click()
        WebDriverWait(driver, 60).until(lambda d: "Synthetic scene" in d.find_element(By.ID, "status").text)
        driver.find_element(By.XPATH, f"//*[@id='explainer']//label[normalize-space()='{args.explainer}']").click()
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 600).until(
            lambda d: any(w in d.find_element(By.ID, "status").text for w in ("Done", "Error"))
        )
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(2)  # let images and the plot paint
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)  # a smaller file for git
        print(driver.find_element(By.ID, "status").text)
        print(f"saved {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
