"""The server's page in headless Chromium, as a person uses it: an image picked on the page gets
its predicted class, and no request leaves the machine."""

from __future__ import annotations

import httpx
import pytest

from conftest import CLASSES, FIXTURE, photos, serving, upload, watched


@pytest.mark.e2e
def test_an_image_picked_on_the_page_gets_its_class(chromium, tmp_path):
    image = photos(tmp_path / "photos", 1)[0]
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), cwd=tmp_path) as server:
        expected = httpx.post(server.url + "predict", files=upload([image]), timeout=60).json()
        page, requested = watched(chromium)
        page.goto(server.url)
        page.wait_for_selector("#about:has-text('3 classes')")
        page.set_input_files("#pick", str(image))
        result = page.wait_for_selector(".result[data-predicted]", timeout=30_000)
        predicted = result.get_attribute("data-predicted")
        assert predicted == expected["predictions"][0]["top"][0]["class"] and predicted in CLASSES
        bars = page.locator(".result .bar")
        assert bars.count() == 3 and predicted in bars.first.inner_text()
        page.close()
    assert requested and all(url.startswith((server.url, "blob:", "data:")) for url in requested), requested
