"""``xraygpt serve`` options: auth parsing, host/port resolution, the --share warning, --mcp check."""

from __future__ import annotations

import sys

import pytest
from _app_server import TINY  # noqa: I001

from xraygpt_app.cli import build_parser
from xraygpt_app.cli import serve as cli_serve
from xraygpt_app.config import load_config
from xraygpt_app.errors import BadInputError


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_auth_pairs_and_file(tmp_path):
    assert cli_serve.parse_auth("ann:pw1, bob:p:w2") == [("ann", "pw1"), ("bob", "p:w2")]
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# team\nann:pw1\n\ncat:pw3\n")
    assert cli_serve.parse_auth(str(auth_file)) == [("ann", "pw1"), ("cat", "pw3")]
    assert cli_serve.parse_auth(None) == [] and cli_serve.parse_auth("  ") == []
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(BadInputError, match="user:password"):
            cli_serve.parse_auth(bad)


def test_host_defaults_to_localhost_and_options_win():
    config = cli_serve.apply_options(load_config(TINY), _args(), {})
    assert (config.app.host, config.app.port, config.app.share) == ("127.0.0.1", 7860, False)
    config = cli_serve.apply_options(load_config(TINY), _args(), {"GRADIO_SERVER_NAME": "0.0.0.0",
                                                                 "GRADIO_SERVER_PORT": "8000"})
    assert (config.app.host, config.app.port) == ("0.0.0.0", 8000)
    args = _args("--host", "10.0.0.5", "--port", "9000", "--share", "--max-file-size", "5mb")
    config = cli_serve.apply_options(load_config(TINY), args, {"GRADIO_SERVER_NAME": "0.0.0.0"})
    assert (config.app.host, config.app.port, config.app.share, config.app.max_file_size) == (
        "10.0.0.5", 9000, True, "5mb")


def test_share_without_auth_warns_before_loading(monkeypatch, capsys):
    def stop(*_args, **_kwargs):
        raise RuntimeError("stop before loading models")

    monkeypatch.setattr("xraygpt_app.web.services.build_services", stop)
    monkeypatch.delenv("XRAYGPT_AUTH", raising=False)
    with pytest.raises(RuntimeError, match="stop before"):
        cli_serve.run(_args("--config", str(TINY), "--share"))
    assert "Anyone who has the public link" in capsys.readouterr().err
    monkeypatch.setenv("XRAYGPT_AUTH", "ann:pw")
    with pytest.raises(RuntimeError, match="stop before"):
        cli_serve.run(_args("--config", str(TINY), "--share"))
    assert "Anyone who has the public link" not in capsys.readouterr().err


def test_mcp_without_the_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mcp", None)  # as if the package were not installed: import raises
    with pytest.raises(BadInputError, match=r"pip install 'mcp==1\.30\.0'"):
        cli_serve.run(_args("--config", str(TINY), "--mcp"))


def test_session_capacity_reaches_gradio(monkeypatch, capsys):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    assert cli_serve.run(_args("--config", str(TINY), "--offline", "--set", "app.session_capacity=7")) == 0
    assert launched["state_session_capacity"] == 7  # Gradio's per-session copies are bounded by the config
    assert "Offline: nothing is downloaded" in capsys.readouterr().out
