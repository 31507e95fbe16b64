"""The web app in headless Chromium (Debian's package; Playwright cannot download browsers here).

The app runs as ``python app.py`` with the tiny real-format models on a free local port.
Screenshots go to test-artifacts/ (git-ignored) for a human to look at; test-artifacts/app.png is the
front-page picture (copy it to docs/app.png to refresh the README's screenshot).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from _app_server import ARTIFACTS, files_holding, running_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NIH = "nih_cxr14_00000001_000_pa_512.png"
DICOM = "cr_siim_chest_pa_mono2_jpeg_baseline.dcm"  # JPEG-compressed DICOM, 1024x1024
WAIT_MS = 120_000
BOT = "#chatbot [data-testid='bot']"


def _chromium() -> str:
    # XRAYGPT_TEST_CHROMIUM picks another browser binary (tests/test_browser_skip.py fakes a missing one)
    path = os.environ.get("XRAYGPT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config):
    with running_app(tmp_path_factory.mktemp("app"), ["app.py"], config=tiny_config) as app:
        yield app


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def uploaded() -> list[bytes]:
    """Every file the tests upload, checked against Gradio's cache at the end."""
    return []


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _open(browser, server, **context_options):
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 1000}, **context_options})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url)
    page.wait_for_selector("#upload")
    return context, page


def _upload(page, path: Path, uploaded: list[bytes]) -> None:
    uploaded.append(path.read_bytes())
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#preview img")


def _greedy(page) -> None:
    page.get_by_text("Generation settings").click()
    page.locator("#do-sample input").uncheck()


def _set_number(page, slider: str, value: int) -> None:
    if not page.locator(slider).is_visible():
        page.get_by_text("Generation settings").click()
    box = page.locator(f"{slider} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _bot_texts(page) -> list[str]:
    return page.locator(BOT).all_inner_texts()


def _wait_for_answers(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length >= {count}")
    page.wait_for_selector("#download a")  # the link comes back when the answer is complete


def _watch_stream(page) -> None:
    page.evaluate("""() => {
        window.__seen = new Set();
        new MutationObserver(() => {
            const bots = document.querySelectorAll("#chatbot [data-testid='bot']");
            if (bots.length) window.__seen.add(bots[bots.length - 1].innerText);
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")


def _ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")


def test_report_follow_up_vqa_and_zero_shot(server, browser, samples_dir, uploaded):
    context, page = _open(browser, server)
    _upload(page, samples_dir / NIH, uploaded)
    assert page.locator("#preview img").count() == 2
    assert "512 × 512" in page.locator("#description").inner_text()
    _greedy(page)
    _set_number(page, "#max-new-tokens", 60)  # more pieces, so the stream is seen even on a fast machine
    _watch_stream(page)
    page.locator("#generate-report").click()
    _wait_for_answers(page, 1)
    report = _bot_texts(page)[0]
    assert report.strip()
    seen = page.evaluate("[...window.__seen]")
    assert len(seen) >= 2 and report.strip() in [s.strip() for s in seen], "the report should stream in"

    _ask(page, "Is there evidence of pleural effusion?")
    _wait_for_answers(page, 2)
    assert "Is there evidence of pleural effusion?" in page.locator("#chatbot").inner_text()
    href = page.locator("#download a").get_attribute("href")
    markdown = base64.b64decode(href.split("base64,", 1)[1]).decode()
    assert "Is there evidence of pleural effusion?" in markdown and "not a diagnosis" in markdown
    assert "Research and education only" in page.locator("#chat-notice").evaluate(
        "el => el.closest('.column').innerText")
    _shot(page, "1-report-chat")
    # the front-page picture (docs/app.png): title, notice, image panel and conversation, the settings folded
    page.get_by_text("Generation settings").click()
    page.locator("#max-new-tokens").wait_for(state="hidden")
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": 1150})

    page.get_by_role("tab", name="VQA").click()
    page.get_by_text("Is the heart size normal?").first.click()  # one click fills the box and asks
    page.wait_for_function("document.querySelector('#vqa-answer').innerText.trim().length > 0")
    assert page.locator("#vqa-question textarea").input_value() == "Is the heart size normal?"
    assert "not a diagnosis" in page.locator(".xr-disclaimer:visible").first.inner_text()
    _shot(page, "2-vqa")

    page.get_by_role("tab", name="Zero-shot").click()
    page.locator("#zs-run").click()
    page.wait_for_function("document.querySelector('#zs-table').innerText.includes('Cardiomegaly')")
    page.wait_for_selector("#zs-chart svg .mark-rect path")
    assert page.locator("#zs-chart svg .mark-rect path").count() == 5
    assert "not a diagnosis" in page.locator(".xr-disclaimer:visible").first.inner_text()
    _shot(page, "3-zero-shot")
    page.get_by_role("radio", name="COVID", exact=True).check()  # a second run: the chart shows it, not the first
    page.locator("#zs-run").click()
    page.wait_for_function("document.querySelector('#zs-chart svg').textContent.includes('COVID')")
    assert page.locator("#zs-chart svg .mark-rect path").count() == 2

    page.locator(".xr-example").nth(1).click()  # another image: no result about the old one may stay
    page.wait_for_function("document.querySelector('#description').innerText.includes('640 × 755')")
    page.wait_for_function("!document.querySelector('#zs-table').innerText.includes('Cardiomegaly')")
    assert page.locator(BOT).count() == 0
    context.close()


def test_corrupt_upload_shows_a_notice(server, browser, uploaded):
    context, page = _open(browser, server)
    broken = b"\x89PNG\r\n\x1a\n" + b"this is not really an image" * 40
    uploaded.append(broken)
    page.locator("#upload input[type=file]").set_input_files(
        files=[{"name": "broken.png", "mimeType": "image/png", "buffer": broken}])
    page.wait_for_function("document.querySelector('#image-notice').innerText.includes('⚠️')")
    assert "Traceback" not in page.content()
    assert page.locator("#preview img").count() == 0
    _shot(page, "4-corrupt-upload")
    context.close()


def test_the_loaded_file_is_named_and_can_be_replaced(server, browser, samples_dir, uploaded):
    context, page = _open(browser, server)
    _upload(page, samples_dir / NIH, uploaded)
    assert page.locator("#loaded-file").inner_text().strip() == f"Loaded: {NIH}"
    first_preview = page.locator("#preview img").first.get_attribute("src")
    uploaded.append((samples_dir / DICOM).read_bytes())
    with page.expect_file_chooser() as chooser:  # the "Replace image…" button beside the name opens a file dialog
        page.locator("#replace").click()
    chooser.value.set_files(str(samples_dir / DICOM))
    page.wait_for_function(f"document.querySelector('#loaded-file').innerText.includes('{DICOM}')")
    assert page.locator("#preview img").first.get_attribute("src") != first_preview
    assert "DICOM" in page.locator("#description").inner_text()
    _shot(page, "4b-loaded-file-and-replace")
    context.close()


def test_what_a_new_user_sees_after_an_upload_and_clear(server, browser, samples_dir, uploaded):
    context, page = _open(browser, server)
    assert "Upload a radiograph" in page.locator("#chatbot").inner_text()
    _upload(page, samples_dir / NIH, uploaded)
    # the drop box gives way to the loaded file's name and one "Replace image…" button
    page.wait_for_selector("#upload", state="hidden")
    page.wait_for_selector("#replace", state="visible")  # the same update, but the browser may draw it a frame later
    assert NIH in page.locator("#loaded-file").inner_text()
    settings, preview = page.get_by_text("Generation settings").bounding_box(), page.locator("#preview").bounding_box()
    assert settings["y"] < preview["y"], "the generation settings sit above the preview, not under the details"
    assert "Image loaded" in page.locator("#chatbot").inner_text()
    page.locator("#generate-report").click()
    _wait_for_answers(page, 1)
    page.locator("#clear").click()  # the image stays: the chat says what to do with it, not to upload one
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length == 0")
    chat = page.locator("#chatbot").inner_text()
    assert "Image loaded" in chat and "Upload a radiograph" not in chat
    _shot(page, "4c-after-upload-and-clear")
    context.close()
    log = server.log()
    assert "set `share=True`" not in log and "--share" in log  # our flag, not Gradio's launch() argument


def test_refused_question_stays_in_the_box(server, browser):
    context, page = _open(browser, server)
    _ask(page, "Is there a pneumothorax?")  # no image yet: refused with a notice
    page.wait_for_function("document.querySelector('#chat-notice').innerText.includes('Upload')")
    assert page.locator("#question textarea").input_value() == "Is there a pneumothorax?"
    context.close()


def test_two_browsers_keep_separate_conversations(server, browser, samples_dir, uploaded):
    (context_a, page_a), (context_b, page_b) = _open(browser, server), _open(browser, server)
    _upload(page_a, samples_dir / NIH, uploaded)
    _upload(page_b, samples_dir / DICOM, uploaded)  # DICOM through gr.File
    _set_number(page_a, "#beams", 8)  # a slower, unstreamed answer for A, so that B has to wait
    _set_number(page_a, "#max-new-tokens", 1000)
    page_a.locator("#generate-report").click()
    page_a.wait_for_function("document.querySelector(\"#chatbot [data-testid='status-tracker']:not(.hide)\")"
                             " || document.querySelector('#download a')")
    page_b.locator("#generate-report").click()  # queued behind A (one generation at a time)
    page_b.wait_for_function(f"document.querySelector('#chatbot').innerText.includes('queue:')"
                             f" || document.querySelectorAll(\"{BOT}\").length > 0")
    if "queue:" in page_b.locator("#chatbot").inner_text():  # depends on timing: a picture, not an assert
        _shot(page_b, "5a-queue-position")
    _wait_for_answers(page_a, 1)
    _wait_for_answers(page_b, 1)
    _ask(page_a, "Question from A about the hila?")
    _ask(page_b, "Question from B about the diaphragm?")
    _wait_for_answers(page_a, 2)
    _wait_for_answers(page_b, 2)
    chat_a, chat_b = page_a.locator("#chatbot").inner_text(), page_b.locator("#chatbot").inner_text()
    assert "from A" in chat_a and "from B" not in chat_a
    assert "from B" in chat_b and "from A" not in chat_b
    assert "512 × 512" in page_a.locator("#description").inner_text()
    description_b = page_b.locator("#description").inner_text()
    assert "1024 × 1024" in description_b and "DICOM" in description_b and "16d7f894" not in description_b
    _shot(page_b, "5-second-browser")
    context_a.close()
    context_b.close()


def test_phone_sized_viewport(server, browser):
    context, page = _open(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.locator(".xr-example").first.click()
    page.wait_for_selector("#preview img")
    page.locator("#generate-report").click()
    _wait_for_answers(page, 1)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways on a phone ({width} px)"
    _shot(page, "6-phone")
    page.get_by_role("tab", name="Zero-shot").click()
    page.locator("#zs-run").click()
    page.wait_for_selector("#zs-chart svg .mark-rect path")
    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    page.locator("#zs-chart").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "6b-phone-zero-shot.png"))  # the viewport, as a phone shows it
    context.close()


def test_missing_weights_are_explained_in_the_tabs(browser, tmp_path):
    absent = ["--set", f"weights.ckpt={tmp_path / 'xraygpt_pretrained.pth'}",
              "--set", f"zeroshot.models.medclip-vit.weights={tmp_path / 'medclip.bin'}"]
    with running_app(tmp_path, ["app.py", *absent]) as app:
        context, page = _open(browser, app)
        missing = page.locator(".xr-missing:visible").first
        assert "xraygpt_pretrained.pth" in missing.inner_text() and "How to get" in missing.inner_text()
        page.get_by_role("tab", name="Zero-shot").click()
        assert "medclip.bin" in page.locator(".xr-missing:visible").first.inner_text()
        _shot(page, "7-missing-weights")
        context.close()


def test_no_uploaded_bytes_remain_in_gradio_cache(browser, server, uploaded):
    # Runs last: every session above has ended; the app deletes each upload once decoded. Without a
    # browser (``browser`` skips) the tests above uploaded nothing, so this one skips with them.
    assert uploaded, "the tests above should have uploaded files"
    for data in uploaded:
        assert files_holding(server.cache_dir, data) == []
    assert [p for p in server.cache_dir.rglob("*") if p.is_file()] == []  # not even empty leftovers
    assert "pleural effusion" not in server.log().lower()  # no user text in the server log


def test_llava_family_chat_in_the_app(browser, samples_dir, tmp_path_factory):
    """The same app on a llava-family config: the model line names it; a report and a follow-up stream."""
    import tinyllava

    tiny = tinyllava.build_llava(tmp_path_factory.mktemp("llava_app"))
    with running_app(tiny.root, ["app.py"], config=tiny.config) as llava_server:
        context, page = _open(browser, llava_server)
        assert "LLaVA-style" in page.locator("#model-line").inner_text()
        _upload(page, samples_dir / NIH, [])
        _greedy(page)
        page.locator("#generate-report").click()
        _wait_for_answers(page, 1)
        _ask(page, "Is there evidence of pleural effusion?")
        _wait_for_answers(page, 2)
        texts = _bot_texts(page)
        assert len(texts) == 2 and all(text.strip() for text in texts)
        _shot(page, "llava_chat")
        context.close()


def test_maps_in_the_chat_vqa_and_zero_shot_tabs(server, browser, samples_dir, uploaded):
    context, page = _open(browser, server)
    _upload(page, samples_dir / NIH, uploaded)
    _greedy(page)
    _set_number(page, "#max-new-tokens", 12)
    page.locator("#generate-report").click()
    _wait_for_answers(page, 1)
    page.get_by_text("Where did it look?").first.click()  # opens the accordion
    page.locator("#chat-map-show").click()
    page.wait_for_selector("#chat-map img")
    chat_map = page.locator("#chat-map").inner_text()
    assert "not a segmentation, not a diagnosis" in chat_map and "gradient x input" in chat_map
    first = page.locator("#chat-map img").get_attribute("src")
    _set_number(page, "#chat-map-opacity", 1)  # re-blended without the model
    page.wait_for_function(f"document.querySelector('#chat-map img').src !== {first!r}")
    _shot(page, "5-chat-map")

    page.get_by_role("tab", name="VQA").click()
    page.get_by_text("Is the heart size normal?").first.click()  # one click fills the box and asks
    page.wait_for_function("document.querySelector('#vqa-answer').innerText.trim().length > 0")
    assert page.locator("#vqa-question textarea").input_value() == "Is the heart size normal?"
    page.locator("text=Where did it look? (heatmap of an answer) >> visible=true").click()
    page.locator("#vqa-map-show").click()
    page.wait_for_selector("#vqa-map img")
    assert "not a segmentation, not a diagnosis" in page.locator("#vqa-map").inner_text()

    page.get_by_role("tab", name="Zero-shot").click()
    page.locator("#zs-run").click()
    page.wait_for_function("document.querySelector('#zs-table').innerText.includes('Cardiomegaly')")
    table = page.locator("#zs-table").inner_text()
    page.locator("#zs-map-show").click()
    page.wait_for_selector("#zs-map img")
    zs_map = page.locator("#zs-map").inner_text()
    assert "Grad-CAM" in zs_map and "not a segmentation, not a diagnosis" in zs_map
    assert page.locator("#zs-table").inner_text() == table
    _shot(page, "6-zero-shot-map")
    page.get_by_role("radio", name="COVID", exact=True).check()  # classify again: the Cardiomegaly map must go
    page.locator("#zs-run").click()
    page.wait_for_function("document.querySelector('#zs-table').innerText.includes('COVID')")
    page.wait_for_function("!document.querySelector('#zs-map img')")  # no map of the previous result stays
    page.locator("#zs-map-show").click()  # the new result's own map
    page.wait_for_selector("#zs-map img")
    assert page.locator("#zs-map").inner_text().split(" — ")[0] in ("Normal", "COVID")  # a label of this result
    page.locator(".xr-example").nth(1).click()  # another image: the old maps go
    page.wait_for_function("document.querySelector('#description').innerText.includes('640 × 755')")
    page.wait_for_function("!document.querySelector('#zs-map img')")
    context.close()
