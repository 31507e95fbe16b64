"""``xraygpt serve``: start the web app (``python app.py`` runs the same thing)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import Config, load_config
from ..errors import BadInputError
from ..weights import LOOPBACK_HOSTS
from .options import add_config_options

AUTH_ENV = "XRAYGPT_AUTH"
CONFIG_ENV = "XRAYGPT_CONFIG"
DOWNLOAD_ENV = "XRAYGPT_DOWNLOAD"
SET_ENV = "XRAYGPT_SET"  # overrides separated by ";" (a Space cannot pass --set)
SHARE_WARNING = """
************************************************************************************
WARNING: --share without --auth. Anyone who has the public link can use this app and
upload images to this machine. Add --auth user:password (or set XRAYGPT_AUTH).
************************************************************************************
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` command."""
    parser = subparsers.add_parser(
        "serve", help="start the web app",
        description="Start the web app (report chat, VQA, zero-shot). Research and education only.")
    add_config_options(parser)
    parser.add_argument("--host", default=None,
                        help="address to bind (default 127.0.0.1, or $GRADIO_SERVER_NAME); 0.0.0.0 opens it "
                             "to the network")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--auth", default=None,
                        help=f"user:password pairs separated by commas, or a file with one pair per line "
                             f"(also ${AUTH_ENV})")
    parser.add_argument("--max-file-size", default=None, help="largest upload, e.g. 50mb (default from config)")
    parser.add_argument("--download", action="store_true",
                        help=f"fetch missing weights from their Hub/URL sources at start-up "
                             f"(also ${DOWNLOAD_ENV}=1)")
    parser.add_argument("--mcp", action="store_true",
                        help="also serve the report/ask/classify endpoints as MCP tools (at /gradio_api/mcp/)")
    parser.set_defaults(func=run)


def parse_auth(spec: str | None) -> list[tuple[str, str]]:
    """``user:pass,user2:pass2`` or the path of a file with one ``user:pass`` per line."""
    if not spec or not spec.strip():
        return []
    path = Path(spec).expanduser()
    if path.is_file():
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        items = [line for line in items if line and not line.startswith("#")]
    else:
        items = [item.strip() for item in spec.split(",") if item.strip()]
    pairs = []
    for item in items:
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise BadInputError("--auth: expected user:password pairs (or a file of them); "
                                 "one entry has no user or no password")
        pairs.append((user.strip(), password))
    return pairs


def apply_options(config: Config, args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """Fold command-line options and the serving environment variables into ``config.app``."""
    app = config.app
    app.host = args.host or environ.get("GRADIO_SERVER_NAME") or app.host
    port = args.port or environ.get("GRADIO_SERVER_PORT")
    app.port = int(port) if port else app.port
    app.share = bool(args.share or app.share)
    app.max_file_size = args.max_file_size or app.max_file_size
    return config


def run(args: argparse.Namespace) -> int:
    """Load the config and the models once, build the app, and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env_overrides = [item.strip() for item in os.environ.get(SET_ENV, "").split(";") if item.strip()]
    config = load_config(args.config or os.environ.get(CONFIG_ENV), [*env_overrides, *args.overrides])
    config = apply_options(config, args, os.environ)
    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV))
    if args.mcp:
        _check_mcp()
    if config.app.share and not auth:
        print(SHARE_WARNING, file=sys.stderr, flush=True)
    if config.app.host not in LOOPBACK_HOSTS and not auth:
        print(f"Note: binding {config.app.host} without --auth: anyone on this network can use the app.",
              file=sys.stderr, flush=True)

    from ..web.services import build_services
    from ..web.ui import CSS, build_app

    download = args.download or os.environ.get(DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")
    services = build_services(config, progress=lambda message: print(message, flush=True), download=download)
    demo = build_app(services)
    demo.launch(server_name=config.app.host, server_port=config.app.port, share=config.app.share,
                auth=auth or None, max_file_size=config.app.max_file_size, mcp_server=args.mcp,
                ssr_mode=False, css=CSS, show_error=False)
    return 0


def _check_mcp() -> None:
    try:
        import mcp  # noqa: F401  (only checking that the extra is installed)
    except ImportError:
        raise BadInputError("--mcp needs the MCP package: pip install 'mcp==1.30.0' (scripts/setup.sh installs it; "
                            "or pip install -e '.[mcp]')") from None
