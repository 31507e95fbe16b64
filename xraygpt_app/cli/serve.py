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
OFFLINE_ENV = "XRAYGPT_OFFLINE"
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
    parser.add_argument("--offline", action="store_true",
                        help=f"download nothing at start-up (by default the public weights that are missing are "
                             f"fetched from their Hub/URL sources, with sizes and licences shown; also "
                             f"${OFFLINE_ENV}=1 or HF_HUB_OFFLINE=1)")
    parser.add_argument("--download", action="store_true", help="(the default; kept for older scripts)")
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

    fetch_on_start(config, offline=args.offline or _env_flag(OFFLINE_ENV) or _env_flag("HF_HUB_OFFLINE"))
    services = build_services(config, progress=lambda message: print(message, flush=True))
    demo = build_app(services)
    # quiet: Gradio's own lines would tell the user to "set `share=True` in `launch()`"; ours name --share.
    # (It still prints a share link itself.) prevent_thread_lock: print once the address is known, then serve.
    demo.launch(server_name=config.app.host, server_port=config.app.port, share=config.app.share,
                auth=auth or None, max_file_size=config.app.max_file_size, mcp_server=args.mcp,
                ssr_mode=False, css=CSS, show_error=False, state_session_capacity=config.app.session_capacity,
                quiet=True, prevent_thread_lock=True)
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if not config.app.share:
        print("* For a public link, restart with --share (and --auth user:password).", flush=True)
    demo.block_thread()
    return 0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def fetch_on_start(config: Config, offline: bool) -> int:
    """Fetch the public weights that are missing (what ``xraygpt fetch`` does), unless ``offline``.

    Nothing here stops the app: a failed or refused download leaves that model "missing", and its
    tab then says what is missing and the commands that get it. Returns the entries still missing.
    """
    from .weights import fetch_weights

    if offline:
        print("Offline: nothing is downloaded. Weights not on this machine are listed in the app, with the "
              "commands that get them.", flush=True)
        return 0
    print("Checking weights; public files that are missing are downloaded now (--offline skips this):", flush=True)
    missing = fetch_weights(config, lambda message: print(message, flush=True))
    if missing:
        print(f"{missing} weights entr{'y is' if missing == 1 else 'ies are'} still missing: the app serves "
              "without them and says in each tab how to get them.", flush=True)
    return missing


def _check_mcp() -> None:
    try:
        import mcp  # noqa: F401  (only checking that the extra is installed)
    except ImportError:
        raise BadInputError("--mcp needs the MCP package: pip install 'mcp==1.30.0' (scripts/setup.sh installs it; "
                            "or pip install -e '.[mcp]')") from None
