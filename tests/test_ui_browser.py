"""The web UI in a real browser: Playwright driving the system's Chromium against a server in this process."""

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import free_port

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium (apt-get install chromium)")
TIMEOUT_MS = 60_000  # a render on a busy 2-core machine; expect() returns as soon as the condition holds


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    from synth.ui import start

    run_dir = tmp_path_factory.mktemp("ui-browser-run")
    demo, generator, url = start(["model=tiny_sdxl_turbo"], run_dir, free_port())
    yield generator, url
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        # swiftshader: the sketch pad draws with WebGL, which headless Chromium has only in software
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        sync_api.expect.set_options(timeout=TIMEOUT_MS)
        page.goto(server[1])
        yield page
        browser.close()


def requests(generator):
    return sorted(path.name for path in generator.run_dir.glob("[0-9]*"))


def draw_stroke(page):
    """A diagonal stroke across the middle of the drawing area, in a few pointer moves (software WebGL is slow)."""
    page.locator("#sketch button[aria-label='Brush']").first.click()
    box = page.locator("#sketch canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 40  # inside the drawing area
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(x + 24 * step, y + 16 * step)
    page.mouse.up()


def test_type_see_draw_see_change(server, page, tmp_path):
    generator, _ = server
    expect = sync_api.expect
    output = page.locator("#output img")

    # 1. Typing a prompt renders it (live mode is on for Turbo).
    page.locator("#prompt textarea").fill("a red car")
    expect(output).to_be_visible()
    expect(page.locator("#info textarea")).to_have_value(re.compile(r"^a red car\nSteps: 2, "))
    first = output.get_attribute("src")

    # 2. A stroke on the sketch pad re-renders from the sketch (image to image): another image.
    draw_stroke(page)
    expect(output).not_to_have_attribute("src", first)
    assert list((generator.run_dir / "inputs").glob("*.png")), "the sketch became the init image"
    screenshot = os.environ.get("SYNTH_UI_SCREENSHOT")  # SYNTH_UI_SCREENSHOT=docs/ui.png: the README's picture
    page.screenshot(path=screenshot or str(tmp_path / "ui.png"), full_page=True)

    # 3. "Use as input" puts the output on the sketch pad, which re-renders from it.
    second = output.get_attribute("src")
    page.locator("#use-as-input").click()
    expect(output).not_to_have_attribute("src", second)

    # 4. With live off an edit renders nothing: the server sees the edit and skips it.
    made = requests(generator)
    page.locator("#live input").uncheck()
    claimed = generator.claimed
    page.locator("#prompt textarea").fill("a blue car")
    for _ in range(1200):  # poll the server-side condition (at most 60 s), not a fixed wait for a result
        if generator.claimed > claimed:
            break
        page.wait_for_timeout(50)
    assert generator.claimed > claimed, "the edit reached the server"
    assert requests(generator) == made


def test_the_cancel_button_stops_the_render(server, page, monkeypatch):
    import threading

    from test_ui_controls import HeldSteps, finished

    generator, _ = server
    page.locator("#live input").set_checked(False)  # only the Generate button renders
    page.locator("#steps input[type=number]").fill("40")
    page.locator("#steps input[type=number]").press("Enter")
    images = set(generator.run_dir.glob("[0-9]*/*.png"))
    held = HeldSteps(monkeypatch, lambda where, step: step == 0)
    cancelled, real_cancel = threading.Event(), generator.cancel

    def cancel(session):
        try:
            return real_cancel(session)
        finally:
            cancelled.set()

    monkeypatch.setattr(generator, "cancel", cancel)
    if not page.locator("#generate").is_visible():
        page.get_by_text("Full mode").click()
    page.locator("#generate").click()
    assert held.reached.wait(60), "the render never started"
    page.locator("#cancel").click()
    assert cancelled.wait(60), "the Cancel button reached the server"
    held.release()
    finished(generator)
    assert [step for _, step, _ in held.calls] == [1] and held.calls[0][2] > 1, held.calls
    assert set(generator.run_dir.glob("[0-9]*/*.png")) == images, "no PNG for the cancelled image"
