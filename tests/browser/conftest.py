"""Browser tests of ``beyondfacial app``: Playwright drives Debian's Chromium.

Playwright's own browser download cannot work offline, so the tests point it at the
``chromium`` package's ``/usr/bin/chromium`` (``.ci/run`` installs it). Without Chromium,
Playwright or gradio a test skips with the reason; under CI a missing Chromium fails.

Every test starts the app on 127.0.0.1 on a free port, on the tiny offline pipeline, and
runs 4 steps at 64 x 64.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: Upper bounds for waiting, never asserted on: a CPU run of the tiny pipeline builds it,
#: then makes the method's picture and the baseline.
START_TIMEOUT_S = 180
RUN_TIMEOUT_MS = 300_000
#: How long the page may take to send a photo it was handed to the server; past this it
#: is handed the photo once more (see AppPage.upload).
UPLOAD_SENT_TIMEOUT_MS = 30_000
STEPS = 4
SIZE = 64


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _skip_or_fail(f"{exc.name} is not installed: pip install -c constraints-cpu.txt "
                      "-e \".[test]\"")
    if not CHROMIUM.exists():
        _skip_or_fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_served(url: str, process: subprocess.Popen | None = None) -> None:
    """Poll the page until it answers; a server process that ends first fails the test."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"beyondfacial app ended with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {START_TIMEOUT_S} s")


@pytest.fixture
def cli_app(tmp_path):
    """``beyondfacial app`` as a user starts it: a process of its own, in ``tmp_path``
    (its runs go to the default ``beyondfacial-app/`` there); yields its URL."""
    port = free_port()
    log = (tmp_path / "app.log").open("w")
    import torch

    # The test reruns the page's command in this process and compares pixels: the app gets
    # this process's torch thread count (one under pytest-xdist), since CPU kernels split
    # their sums by thread and a different split changes the last bits.
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, "-m", "bf_core.cli", "app", "--host",
                                "127.0.0.1", "--port", str(port)], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def start_app(tmp_path):
    """Start the app in this process (to hand it a pipeline cache); returns its URL."""
    from bf_core.app import ui

    started = []

    def start(cache=None) -> str:
        port = free_port()
        started.append(ui.launch(host="127.0.0.1", port=port, out=tmp_path / "runs",
                                 cache=cache, block=False))
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url)
        return url

    yield start
    for app in started:
        app.close()


PROGRESS_RECORDER = r"""() => {
  window.bfProgress = [];
  const step = /seed \d+, (?:BeyondFacial|baseline): step \d+ of \d+/;
  new MutationObserver((records) => {
    for (const record of records) {
      const node = record.target.nodeType === Node.TEXT_NODE ? record.target.parentElement
                                                              : record.target;
      const found = node && node.textContent.match(step);
      if (found && window.bfProgress.at(-1) !== found[0]) window.bfProgress.push(found[0]);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _is_upload(request) -> bool:
    """Gradio's upload of a file box's files: ``POST /gradio_api/upload``."""
    return request.method == "POST" and "/upload" in request.url


class AppPage:
    """The app's page, by the element ids the app gives its components."""

    def __init__(self, page, url: str):
        self.page = page
        #: What the browser said that a failing test should show: console errors, failed
        #: requests and server errors.
        self.reports: list[str] = []
        page.on("console", lambda message: message.type == "error"
                and self.reports.append(f"console: {message.text}"))
        page.on("requestfailed", lambda request: self.reports.append(
            f"failed: {request.method} {request.url} ({request.failure})"))
        page.on("response", lambda response: response.status >= 400 and self.reports.append(
            f"HTTP {response.status}: {response.request.method} {response.url}"))
        page.set_default_timeout(RUN_TIMEOUT_MS)
        page.goto(url)
        page.locator("#generate").wait_for()

    def fill(self, photo: Path | None, prompt: str) -> None:
        """Upload ``photo`` and type the prompt, steps and size."""
        if photo is not None:
            self.upload(photo)
        self.page.locator("#prompt textarea").fill(prompt)
        self.page.locator("#steps input").fill(str(STEPS))
        self.page.locator("#height input").fill(str(SIZE))
        self.page.locator("#width input").fill(str(SIZE))

    def upload(self, photo: Path) -> None:
        """Give the photo to the page's file box and wait until the box lists it once.

        The box lists a photo as a row labelled with its name, whose text is split across
        elements, so looking for the name as one text never finds the listing: it found
        only what the box shows while uploading, and missed a quick upload on CI. A photo
        the page never sent to the server is handed over once more; one that was sent is
        only waited for, since handing it over again adds a second copy to the box."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import expect

        photos = self.page.locator("#photos")
        for _ in range(2):
            try:
                with self.page.expect_request(_is_upload, timeout=UPLOAD_SENT_TIMEOUT_MS):
                    photos.locator("input[type=file]").set_input_files(str(photo))
                break
            except PlaywrightTimeout:
                continue
        else:
            pytest.fail(f"the page sent no upload of {photo.name} in 2 x "
                        f"{UPLOAD_SENT_TIMEOUT_MS // 1000} s; the browser reported "
                        f"{self.reports}")
        listed = photos.locator(f'[aria-label="{photo.name}"]')
        try:
            expect(listed).to_have_count(1, timeout=RUN_TIMEOUT_MS)
        except AssertionError as exc:
            pytest.fail(f"the file box does not list the uploaded {photo.name} once: it "
                        f"shows {photos.inner_text()!r}; the browser reported "
                        f"{self.reports}; {exc}")

    def give_model_paths(self, base_model: Path, checkpoint: Path) -> None:
        """Open "Model paths", type both paths, and wait until the page has taken them.

        The section's boxes are made when it opens, and a base model typed at once, with
        Generate clicked before the page's answer to it (hiding the tiny-pipeline banner)
        came back, was lost on CI: the run saw a checkpoint without its base model. So a box
        is typed into until it holds its text, and the banner must hide before going on."""
        from playwright.sync_api import expect

        self.page.locator("#model-paths").get_by_text("Model paths").click()
        banner = self.page.locator("#tiny-banner")
        for elem_id, path in (("base-model", base_model), ("checkpoint", checkpoint)):
            box = self.page.locator(f"#{elem_id} textarea, #{elem_id} input").first
            self.type_until_held(box, str(path))
            if elem_id == "base-model":
                expect(banner).to_be_hidden(timeout=RUN_TIMEOUT_MS)
        for elem_id, path in (("base-model", base_model), ("checkpoint", checkpoint)):
            expect(self.page.locator(f"#{elem_id} textarea, #{elem_id} input").first
                   ).to_have_value(str(path))

    @staticmethod
    def type_until_held(box, text: str, tries: int = 3) -> None:
        """Fill ``box`` until it holds ``text`` (a box made a moment ago may drop a first
        fill); fails after ``tries`` fills that did not hold."""
        from playwright.sync_api import expect

        for _ in range(tries):
            box.fill(text)
            try:
                expect(box).to_have_value(text, timeout=5_000)
                return
            except AssertionError:
                continue
        pytest.fail(f"the box did not keep {text!r} after {tries} fills")

    def open_advanced(self) -> None:
        self.page.locator("#advanced").get_by_text("Advanced").click()

    def generate(self) -> None:
        self.page.locator("#generate").click()

    def wait_for_message(self, text: str | re.Pattern) -> None:
        """Wait, as long as a run may take, for ``text`` to show: an error comes back
        only after the run got that far (a first run loads its pipeline first, which took
        longer than an assertion's own 5 s on CI)."""
        from playwright.sync_api import expect

        expect(self.page.get_by_text(text)).to_be_visible(timeout=RUN_TIMEOUT_MS)

    def record_progress(self) -> None:
        """From now on, keep every step the progress bar shows: a run of the tiny pipeline
        passes its steps quicker than polling the page could see them."""
        self.page.evaluate(PROGRESS_RECORDER)

    def progress_seen(self) -> list[str]:
        return self.page.evaluate("() => window.bfProgress")

    def wait_for_results(self) -> None:
        for gallery in ("#method-images", "#baseline-images"):
            self.page.locator(f"{gallery} img").first.wait_for()
        self.page.locator("#settings-file a").first.wait_for()

    def image_files(self, gallery: str) -> list[bytes]:
        """The files behind a gallery's pictures, as the browser fetches them."""
        images = self.page.locator(f"#{gallery} img")
        sources = [images.nth(i).get_attribute("src") for i in range(images.count())]
        return [self.page.request.get(src).body() for src in dict.fromkeys(sources)]

    def settings(self) -> dict:
        """The settings JSON, downloaded through its link."""
        with self.page.expect_download() as download:
            self.page.locator("#settings-file a").first.click()
        return json.loads(Path(download.value.path()).read_text())

    def command(self) -> str:
        return self.page.locator("#cli-command textarea").input_value()

    def screenshot(self, path: Path) -> Path:
        self.page.wait_for_load_state("networkidle")
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_(url: str) -> AppPage:
        context = browser.new_context(viewport={"width": 1280, "height": 1000},
                                      accept_downloads=True)
        contexts.append(context)
        return AppPage(context.new_page(), url)

    yield open_
    for context in contexts:
        context.close()
