"""The web UI in a real browser (Debian's Chromium driven by Playwright) against the simulated mixed fleet.

Types a prompt, clicks Generate, watches each image's progress bar advance and the images appear, and reads the fleet
view; the screenshots are saved in test-output/webui/ at the repo root (gitignored; their paths are printed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.system.conftest import deploy_once, tiny_lora_dir, wait_for_policy, wait_for_replicas

pytestmark = pytest.mark.system

CHROMIUM = "/usr/bin/chromium"
# From ../shared/FACTS.md: what lets Debian's Chromium run headless in a sandbox-less container with no network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url(mixed_fleet):
    cards, _ = mixed_fleet
    url = deploy_once(mixed_fleet, lora_dir=tiny_lora_dir())  # test_routing's service, when it ran before
    wait_for_policy(url, "tier_aware", "vram_aware")
    wait_for_replicas(url, len(cards))
    return url


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} missing: run tests/tools/install.sh (it runs apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_page_and_its_files_are_served_and_nothing_else(url):
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "https://" not in page.text and "http://" not in page.text  # no CDN: works offline
    assert httpx.get(f"{url}/static/app.js", timeout=30).headers["content-type"].startswith("text/javascript")
    for escape in ("/static/..%2Fwebui.py", "/static/%2E%2E%2Fingress.py", "/static/missing.js"):
        assert httpx.get(f"{url}{escape}", timeout=30).status_code == 404, escape


@pytest.fixture(scope="module")
def shots(repo_root) -> Path:
    """Where the screenshots go, kept after the run for people to look at."""
    folder = repo_root / "test-output" / "webui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page, path: Path, **options) -> None:
    page.screenshot(path=str(path), **options)
    print(f"screenshot: {path}")


def test_generate_shows_progress_then_images_and_the_fleet_lists_every_card(url, browser, shots):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    # The fleet view lists the five simulated cards with their tiers and VRAM bars.
    page.wait_for_function("document.querySelectorAll('#fleet-cards tr.card').length === 5", timeout=60_000)
    rows = page.locator("#fleet-cards tr.card").all_inner_texts()
    assert any("RTX 4090" in row for row in rows) and any("GTX 1650" in row for row in rows)
    assert all("GiB" in row for row in rows)
    assert page.locator("#fleet-tiers .tier").count() >= 1
    # Record every value the progress bars take, from the moment the first tile appears.
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver((records) => {
            for (const r of records) {
                if (r.type === 'attributes' && r.attributeName === 'aria-valuenow')
                    window.progressSeen.push(Number(r.target.getAttribute('aria-valuenow')));
            }
        }).observe(document.getElementById('gallery'), {subtree: true, attributes: true, childList: true});
    }""")
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#width", "512")
    page.fill("#height", "512")
    page.fill("#n", "2")
    page.fill("#steps", "40")
    page.fill("#seed", "7")
    # The LoRA choice lists the service's adapters; the requests carry the one picked.
    page.wait_for_selector("#lora-row:not([hidden])", timeout=30_000)
    assert page.locator("#lora option").all_inner_texts() == ["none", "tiny-glow", "tiny-ink"]
    page.select_option("#lora", "tiny-ink")
    page.fill("#lora-scale", "0.8")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/stream") else None)
    page.click("#generate")
    try:  # a picture of the bars mid-way, for people (the assertions below use the recorded values)
        page.wait_for_selector("#gallery .progress[aria-valuenow]:not([aria-valuenow='0']):not(.finished)",
                               timeout=30_000)
        screenshot(page, shots / "webui-progress.png", full_page=True)
    except Exception:
        pass
    page.wait_for_function("document.querySelectorAll('#gallery .tile.done img').length === 2", timeout=180_000)
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < 100 for value in seen), f"no intermediate progress: {seen}"
    assert 100 in seen
    captions = page.locator("#gallery figcaption").all_inner_texts()
    assert sorted(c.split(" · ")[0] for c in captions) == ["seed 7", "seed 8"]
    size = page.evaluate("[...document.querySelectorAll('#gallery img')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert size == [[512, 512], [512, 512]]
    assert page.locator("#status").inner_text() == "done"
    assert [(body["lora"], body["lora_scale"]) for body in sent] == [("tiny-ink", 0.8)] * 2
    screenshot(page, shots / "webui.png", full_page=True)
    page.close()


def test_a_rejected_request_shows_the_reason_on_its_tile(url, browser, shots):
    page = browser.new_page()
    page.goto(url)
    page.fill("#prompt", "a red fox")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#seed", str(2**40))  # the browser lets it through; the service answers 422
    page.click("#generate")
    page.wait_for_selector("#gallery .tile.failed", timeout=60_000)
    assert "seed" in page.locator("#gallery .tile.failed .error").inner_text()
    screenshot(page, shots / "webui-error.png")
    page.close()
