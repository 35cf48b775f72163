"""Screenshot of the demo page with results (docs/demo.png), taken with headless Chromium.

    python docs/take_screenshot.py                       # the quickstart's student, into docs/demo.png
    python docs/take_screenshot.py --out /tmp/demo.png --student tiny/student.safetensors --teacher_dir tiny

Starts `app.py` on a free local port, with every argument this script does not know passed on to it (the
weights: --student, --teacher_dir, --teacher_<mode>, --device, ...), uploads a scikit-image photo, types the
prompt, presses Translate, waits for every result and saves the whole page as a palette PNG of at most --max_kb.

Needs Chromium (`apt-get install chromium`) and playwright-python (`pip install playwright`); Chromium is
found on PATH (or pass --chromium), since `playwright install` is not needed.
"""
from __future__ import annotations

import argparse
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from fcdiffusion import cli
from fcdiffusion.core.errors import RunError
from fcdiffusion.train.demo_data import CAPTIONS, load_photo

ROOT = Path(__file__).resolve().parents[1]
RESULT_IMAGES = "document.querySelectorAll('.result-gallery img')"
ERROR_TOAST = ".toast-body.error"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", default="docs/demo.png", help="where the PNG goes")
    parser.add_argument("--photo", default="chelsea", choices=list(CAPTIONS), help="the scikit-image photo to use")
    parser.add_argument("--prompt", default="a watercolor painting of a tabby cat with green eyes",
                        help="the prompt to type")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium executable (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app and the results")
    parser.add_argument("--max_kb", type=int, default=290, help="PNG size limit in KB (fewer colours until it fits)")
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, app: subprocess.Popen, deadline: float) -> None:
    """Return once `url` answers; raise if the app exits or the deadline passes first."""
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"app.py exited with status {app.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"app.py did not serve {url} in time")


def shoot(url: str, photo: Path, prompt: str, chromium: str, width: int, timeout: float) -> bytes:
    """Fill the page at `url`, press Translate, wait for all results; the full-page screenshot as PNG bytes."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url, wait_until="networkidle")
        page.locator("input[type=file]").first.set_input_files(photo)
        page.locator("img[alt]").first.wait_for()  # the uploaded photo's preview
        page.get_by_label("prompt").fill(prompt)
        modes = page.locator("input[type=checkbox]:checked").count()
        page.get_by_role("button", name="Translate").click()
        expected = 3 * modes
        page.wait_for_function(
            f"{RESULT_IMAGES}.length >= {expected} && [...{RESULT_IMAGES}].every(i => i.complete && i.naturalWidth)"
            f" || document.querySelector('{ERROR_TOAST}')", timeout=timeout * 1000)
        if page.locator(ERROR_TOAST).count():
            raise RuntimeError(f"the page reported an error: {page.locator(ERROR_TOAST).first.inner_text()}")
        page.mouse.move(0, 0)
        shot = page.screenshot(full_page=True)
        browser.close()
    return shot


def small_png(png: bytes, max_bytes: int) -> bytes:
    """The screenshot as a palette PNG of at most `max_bytes`: the most colours (256 down to 64) that fit, else
    the smallest tried."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (256, 192, 128, 96, 64):
        out = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
        if out.tell() <= max_bytes:
            break
    return out.getvalue()


def run(args: argparse.Namespace, app_args: list[str]) -> None:
    """Serve app.py with `app_args` on a free port, take the screenshot and write it to --out."""
    if not args.chromium:
        raise cli.UsageError("no Chromium found: install it (apt-get install chromium) or pass --chromium")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp, f"{args.photo}.png")
        Image.fromarray(load_photo(args.photo)).save(photo)
        log = Path(tmp, "app.log")
        with open(log, "w") as log_file:
            app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *app_args],
                                   stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + args.timeout
            wait_for_server(url, app, deadline)
            shot = shoot(url, photo, args.prompt, args.chromium, args.width, deadline - time.monotonic())
            png = small_png(shot, args.max_kb * 1024)
        except Exception as error:  # any failure of the app or the browser: show it with the app's output
            raise RunError(f"{error}\n--- app.py's output ---\n{log.read_text()}") from error
        finally:
            app.terminate()
            app.wait(timeout=30)
    if len(png) > args.max_kb * 1024:
        raise RunError(f"the screenshot is {len(png) // 1024} KB, over --max_kb {args.max_kb}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"wrote {out} ({len(png) // 1024} KB)")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="forward")


if __name__ == "__main__":
    sys.exit(main())
