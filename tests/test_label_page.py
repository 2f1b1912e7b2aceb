"""The /label page in headless Chromium against a live service: labels land in the label store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import REDIS_URL, LiveService
from playwright.sync_api import Browser, expect, sync_playwright

from models.labels import LabelStore
from tests.test_labelling_http import queue_by_predicting

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu",
    "--disable-background-networking", "--disable-component-update",
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-packages chromium chromium-driver")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_a_person_labels_with_keys_clicks_and_skips(
    live_service: LiveService, queue_prefix: str, browser: Browser, tmp_path: Path
) -> None:
    most_uncertain_first = queue_by_predicting(live_service, (128, 126, 120))
    page = browser.new_page()
    page.goto(f"{live_service.url}/label")

    expect(page.locator("#guesses li")).to_have_count(2)
    expect(page.get_by_role("button", name="dark")).to_be_visible()
    expect(page.locator("#progress")).to_contain_text("2 waiting · 1 being labelled")
    page.screenshot(path=str(tmp_path / "label-page.png"))

    page.keyboard.press("2")  # second class: light
    expect(page.locator("#status")).to_have_text("Labelled light.")
    # The page ignores keys and clicks until the next task is shown; progress updates after it.
    expect(page.locator("#progress")).to_contain_text("1 waiting · 1 being labelled")
    page.get_by_role("button", name="Skip").click()
    expect(page.locator("#status")).to_have_text("Skipped.")
    expect(page.locator("#progress")).to_contain_text("0 waiting · 2 being labelled")
    page.get_by_role("button", name="dark").click()
    expect(page.locator("#status")).to_have_text("Labelled dark.")
    expect(page.locator("#progress")).to_contain_text("You labelled 2 this session")

    store = LabelStore(redis.Redis.from_url(REDIS_URL), queue_prefix)
    labelled = {record.task_id: record.label for record in store.all()}
    first, skipped, third = most_uncertain_first
    assert labelled == {first: "light", third: "dark"}

    # The skipped task comes back once nothing else is left.
    expect(page.locator("#task")).to_be_visible()
    page.keyboard.press("1")
    expect(page.locator("#empty")).to_be_visible()
    assert {record.task_id: record.label for record in store.all()}[skipped] == "dark"
