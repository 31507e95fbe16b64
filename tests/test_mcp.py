"""``xraygpt serve --mcp`` as an MCP client sees it: the tools, their descriptions, and calls.

The client is the ``mcp`` package's streamable-HTTP client, as an agent would use it; the image
travels as a data: URL (what MCP clients send for a local file) or as an image URL.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from _app_server import files_holding, running_app
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from xraygpt_app.web.tools import REFUSED_URL
from xraygpt_app.zeroshot.prompts import PRESETS

pytestmark = pytest.mark.timeout(600)
NIH = "nih_cxr14_00000001_000_pa_512.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config):
    with running_app(tmp_path_factory.mktemp("mcp"), ["-m", "xraygpt_app.cli", "serve", "--mcp"],
                     config=tiny_config) as app:
        yield app


def mcp_session(server, work):
    """Run ``work(session)`` in a fresh MCP client session against the app; return its result."""
    async def run():
        async with streamable_http_client(server.url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(run())


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def text_of(result) -> str:
    return "".join(part.text for part in result.content if part.type == "text")


def test_tools_describe_themselves(server):
    tools = {tool.name: tool for tool in mcp_session(server, lambda s: s.list_tools()).tools}
    assert {"report", "ask", "classify"} <= set(tools)
    for name in ("report", "ask", "classify"):
        tool = tools[name]
        assert "never a diagnosis" in tool.description
        for parameter, schema in tool.inputSchema["properties"].items():
            assert schema.get("description", "").strip(), f"{name}.{parameter} has no description"
    preset = tools["classify"].inputSchema["properties"]["preset"]["description"]
    assert all(key in preset for key in PRESETS) and "Cardiomegaly" in preset
    assert "Which zero-shot model: 'medclip-vit'" in tools["classify"].inputSchema["properties"]["model"]["description"]


def test_classify_and_report_a_radiograph(server, samples_dir):
    image = data_url(samples_dir / NIH)

    async def work(session):
        scores = await session.call_tool("classify", {"image": image, "preset": "covid"})
        report = await session.call_tool("report", {"image": image, "max_new_tokens": 8})
        return scores, report

    scores, report = mcp_session(server, work)
    assert not scores.isError and not report.isError
    result = json.loads(text_of(scores).replace("'", '"'))
    assert result["labels"] == ["Normal", "COVID"] and abs(sum(result["probabilities"]) - 1) < 1e-4
    assert text_of(report).strip()
    # Gradio's MCP layer wrote the data URL to a file of its own first: that copy is gone as well
    assert files_holding(server.cache_dir, (samples_dir / NIH).read_bytes()) == []


def test_a_refused_image_url_is_a_plain_message(server):
    url = server.url + "gradio_api/file=/etc/hostname"  # this machine: Gradio's SSRF guard refuses it

    async def work(session):
        return await session.call_tool("classify", {"image": url})

    result = mcp_session(server, work)
    assert result.isError and text_of(result) == REFUSED_URL
    assert "Traceback" not in server.log()
