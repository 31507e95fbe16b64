"""Each public API endpoint through gradio_client, against the running app (``xraygpt serve``)."""

from __future__ import annotations

import re

import pytest
from _app_server import files_holding, running_app

gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.timeout(600)

AUTH = ("tester", "not-a-real-secret")
NIH = "nih_cxr14_00000001_000_pa_512.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config):
    command = ["-m", "xraygpt_app.cli", "--verbose", "serve"]  # INFO logs on, to check what they carry
    with running_app(tmp_path_factory.mktemp("api"), command, {"XRAYGPT_AUTH": ":".join(AUTH)},
                     config=tiny_config) as app:
        yield app


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server.url, auth=AUTH, verbose=False)


@pytest.fixture
def image(samples_dir):
    return gradio_client.handle_file(str(samples_dir / NIH))


def test_endpoints_are_listed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/report", "/ask", "/classify"} <= names


def test_report_and_ask(client, image):
    report = client.predict(image, 12, 1.0, 0.9, 1, api_name="/report")
    assert isinstance(report, str) and report.strip()
    answer = client.predict(image, "Is there evidence of pleural effusion?", api_name="/ask")
    assert isinstance(answer, str)


def test_classify_preset_and_custom_labels(client, image):
    scores = client.predict(image, "medclip-vit", "covid", "", api_name="/classify")
    assert scores["labels"] == ["Normal", "COVID"] and abs(sum(scores["probabilities"]) - 1) < 1e-4
    scores = client.predict(image, "medclip-vit", "chexpert5", "effusion, pneumonia, no finding", api_name="/classify")
    assert scores["labels"] == ["effusion", "pneumonia", "no finding"]


def test_classify_returns_heatmaps_when_asked(client, image):
    plain = client.predict(image, "medclip-vit", "covid", "", api_name="/classify")
    mapped = client.predict(image, "medclip-vit", "covid", "", True, api_name="/classify")
    assert "heatmaps" not in plain and mapped["logits"] == plain["logits"]
    assert [m["label"] for m in mapped["heatmaps"]] == ["Normal", "COVID"]
    assert len(mapped["heatmaps"][0]["grid"]) == 7 and mapped["heatmaps"][0]["overlay_png"].startswith("data:image/png")


def test_bad_input_is_a_plain_error(client, server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(Exception, match="PNG") as info:
        client.predict(gradio_client.handle_file(str(broken)), "Any effusion?", api_name="/ask")
    assert "Traceback" not in str(info.value)
    assert "Traceback" not in server.log()  # a user's bad input is not a server fault


def test_login_is_required(server):
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises((AuthenticationError, ValueError), match="Could not login"):
        gradio_client.Client(server.url, auth=("tester", "wrong"), verbose=False)


def test_api_uploads_do_not_stay_on_disk(client, image, server, samples_dir):
    client.predict(image, "medclip-vit", "rsna", "", api_name="/classify")
    assert files_holding(server.cache_dir, (samples_dir / NIH).read_bytes()) == []


def test_logs_carry_sizes_not_content(client, image, server):
    client.predict(image, "Is the cardiac silhouette enlarged?", api_name="/ask")
    log = server.log()
    assert re.search(r"api answer: \d+ bytes in", log)
    assert "cardiac silhouette" not in log and NIH not in log
    assert "/gradio_api/upload" not in log and "/gradio_api/queue" not in log  # no access log of clients
