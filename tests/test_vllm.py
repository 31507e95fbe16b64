"""The LLM on a vLLM server (``runtime.llm_backend: vllm``) against the in-process engine, and its faults.

Needs the server's environment (``bash scripts/setup.sh --vllm`` makes ``.venv-vllm``); without it the
module is skipped. ``.ci/run`` runs it after the main suite. One server is launched the production way
(from ``.venv-vllm``, on a loopback port, eager, a 64 MiB KV cache) for a tiny XrayGPT whose LLaMA has
head size 32 (the CPU build's smallest); the llava family reaches the same server by ``llm_server.url``
(both families share the LLM folder, which carries a chat template). Servers only on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import GREEDY, REPO

from xraygpt_app.api import Assistant
from xraygpt_app.config import load_config
from xraygpt_app.errors import BadInputError, ConfigError, LLMServerError
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.serving.server import LLMServer, free_port, launch_command

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
if not VLLM_PYTHON.is_file():
    pytest.skip(f"{VLLM_PYTHON} is missing: `bash scripts/setup.sh --vllm` makes the vLLM environment",
                allow_module_level=True)
pytestmark = pytest.mark.vllm

QUESTIONS = ("Describe the given chest x-ray image in detail.", "Is there pleural effusion?",
             "Is the heart size normal?")
CONTEXT = 512  # the launched server's --max-model-len (llm.max_length of the launching config)
SERVER = ["runtime.llm_backend=vllm", f"llm.max_length={CONTEXT}", "llm_server.launch.kv_cache_bytes=67108864"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_dir):
    """A tiny XrayGPT and a tiny llava model sharing one LLM folder (head size 32, TinyLlama's chat template)."""
    import tinyllava
    import tinymodels

    root = tmp_path_factory.mktemp("vllm")
    dims = tinymodels.with_dims(llm_heads=2)
    xraygpt = tinymodels.build_all(root, dims)
    tinyllava.write_chat_llm(xraygpt.llm_dir, dims)  # the same weights, now with a chat template
    tower, text, _ = tinyllava.write_tower(root)
    projector = tinyllava.write_projector(root / "projector.safetensors", tinyllava.TOWER_WIDTH, dims.llm_hidden)
    llava = root / "llava.yaml"
    llava.write_text(yaml.safe_dump(tinyllava.config_dict(tower.name, text.name, "vicuna", projector.name)))
    return {"root": root, "xraygpt": xraygpt.config, "llava": llava, "llm": xraygpt.llm_dir}


@pytest.fixture(scope="module", autouse=True)
def vllm_files_in_temp(tmp_path_factory):
    """vLLM's caches and temp files go to a test folder, not the home folder."""
    folder = tmp_path_factory.mktemp("vllm-cache")
    saved = {k: os.environ.get(k) for k in ("VLLM_CACHE_ROOT", "TMPDIR")}
    os.environ.update(VLLM_CACHE_ROOT=str(folder), TMPDIR=str(folder))
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def image(samples_dir):
    return load_radiograph(samples_dir / "nih_cxr14_00000001_000_pa_512.png").image


@pytest.fixture(scope="module")
def remote(files):
    """The tiny XrayGPT with its LLM on a vLLM server that loading it launched."""
    model = Assistant.from_config(files["xraygpt"], SERVER)
    yield model
    model.model.llm.server.stop()


@pytest.fixture(scope="module")
def server(remote) -> LLMServer:
    return remote.model.llm.server


def _conversation(model: Assistant, image, questions=QUESTIONS, **settings) -> list:
    session = model.chat(image)
    return [session.ask(q, **{**GREEDY, **settings}) for q in questions]


def _metric(server: LLMServer, name: str, label: str = "") -> float:
    """The sum of a Prometheus metric's samples on the server's /metrics (those whose labels hold ``label``)."""
    conn = server.connection()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    samples = re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
    return sum(float(value) for labels, value in samples if label in labels)


@pytest.mark.parametrize("family", ["xraygpt", "llava"])
def test_greedy_answers_equal_in_process_over_follow_ups(family, files, remote, server, image) -> None:
    local = Assistant.from_config(files[family])
    model = remote if family == "xraygpt" else Assistant.from_config(
        files[family], ["runtime.llm_backend=vllm", f"llm_server.url={server.url}"])
    expected, got = _conversation(local, image), _conversation(model, image)
    for want, turn in zip(expected, got, strict=True):
        assert turn.prompt == want.prompt
        assert turn.token_ids == want.token_ids and turn.answer == want.answer
    # follow-ups hit vLLM's prefix cache: system text, image and earlier turns (whole 32-token blocks)
    assert all(turn.timings["reused_tokens"] >= 32 for turn in got[1:]), [t.timings for t in got]


def test_prefix_cache_counts_on_the_server(server, remote, image) -> None:
    before = _metric(server, "vllm:prefix_cache_hits_total")
    _conversation(remote, image, QUESTIONS[:2])
    assert _metric(server, "vllm:prefix_cache_hits_total") - before >= 32


def test_stop_aborts_the_request_on_the_server(server, remote, image) -> None:
    session, cancel = remote.chat(image), threading.Event()
    generated = _metric(server, "vllm:generation_tokens_total")
    for _ in session.ask_stream(QUESTIONS[0], cancel=cancel, do_sample=False, max_new_tokens=300, min_length=0):
        cancel.set()
    turn = session.turns[-1]
    assert turn.cancelled and len(turn.token_ids) < 300
    deadline = time.monotonic() + 60
    while _metric(server, "vllm:num_requests_running"):
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.2)
    # aborted: the server wrote far fewer than the 300 tokens it was asked for
    assert _metric(server, "vllm:generation_tokens_total") - generated < 300


def test_beams_are_refused_clearly(remote, image) -> None:
    with pytest.raises(BadInputError, match="Beam search.*vLLM backend"):
        remote.chat(image).ask(QUESTIONS[0], num_beams=2, max_new_tokens=4)


def test_old_turns_leave_the_context_with_notice(remote, image) -> None:
    session = remote.chat(image)
    turns = [session.ask(q, do_sample=False, max_new_tokens=300) for q in QUESTIONS]
    assert turns[0].dropped_turns == 0 and turns[-1].dropped_turns >= 1


def test_web_chat_and_answer_map_through_the_server(remote, image) -> None:
    """The app's handlers on the vLLM backend: the chat streams, Regenerate re-asks; an answer's heatmap says
    what it needs."""
    from xraygpt_app.web import handlers as h
    from xraygpt_app.web import maps
    from xraygpt_app.web.services import Services

    services, state = Services(config=remote.config, assistant=remote), h.UserState(image=image)
    messages, state, note, _ = list(h.ask(state, services, QUESTIONS[1], GREEDY))[-1]
    assert note == "" and messages[-1]["content"] == state.session.turns[-1].answer
    first = state.session.turns[-1].token_ids
    messages, state, note, _ = list(h.regenerate(state, services, GREEDY))[-1]  # greedy: the same answer again
    assert note == "" and len(messages) == 2 and state.session.turns[-1].token_ids == first
    _, kept, note = maps.report_map(state, services, 0, "", 0.5)
    assert kept is None and "need the language model's layers in this process" in note


def test_too_long_prompt_is_a_plain_message(files, server, image) -> None:
    model = Assistant.from_config(files["llava"], ["runtime.llm_backend=vllm", f"llm_server.url={server.url}"])
    session = model.chat(image)
    long_question = "Is there a pleural effusion? " * 68  # within the app's 2000 tokens, beyond the server's 512
    with pytest.raises(LLMServerError, match=r"refused this answer: .*HTTP 400"):
        session.ask(long_question, **GREEDY)
    assert session.ask(QUESTIONS[0], **GREEDY).token_ids  # the conversation goes on


def test_unreachable_url_is_a_plain_message(files) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LLMServerError, match=f"server at {url} does not answer"):
        Assistant.from_config(files["xraygpt"], ["runtime.llm_backend=vllm", f"llm_server.url={url}"])


def test_head_size_16_is_refused_before_launch(shared_dir) -> None:
    config = load_config(REPO / "eval_configs" / "tiny_fixture.yaml", ["runtime.llm_backend=vllm"])
    with pytest.raises(ConfigError, match="head size is 16.*32, 64"):
        launch_command(config, Path(config.weights.llama_model.sources[0]), 512)


def test_another_vocabulary_is_refused_before_launch(files, tmp_path) -> None:
    import tinymodels

    padded = tinymodels.with_vocabulary(tinymodels.llama(tinymodels.with_dims(llm_heads=2)), 1024)
    tinymodels.save_llama_safetensors(padded, tmp_path / "other")
    config = load_config(files["xraygpt"], [*SERVER, f"llm_server.launch.model={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="vocab_size 1024 .* has 1000"):
        launch_command(config, files["llm"], 512)


def test_slow_start_times_out_and_stops_the_server(files) -> None:
    config = load_config(files["xraygpt"], SERVER)
    command, port = launch_command(config, files["llm"], CONTEXT)
    server = LLMServer(f"http://127.0.0.1:{port}", command, start_timeout=1.0)
    with pytest.raises(LLMServerError, match="did not become healthy within 1 s"):
        server.start()
    assert server.process.poll() is not None


def test_a_silent_server_times_out_between_tokens(files, server, image) -> None:
    model = Assistant.from_config(files["xraygpt"], ["runtime.llm_backend=vllm", f"llm_server.url={server.url}",
                                                     "llm_server.token_timeout_s=2"])
    session = model.chat(image)
    os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(LLMServerError, match="sent nothing for 2 s"):
            session.ask(QUESTIONS[0], **GREEDY)
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)


def test_cli_ask_launches_the_server_and_stops_it(files, server, samples_dir) -> None:
    image = samples_dir / "nih_cxr14_00000001_000_pa_512.png"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "xraygpt_app.cli", "ask", str(image), "-q", QUESTIONS[1],
                           "-c", str(files["xraygpt"]), "--set", "runtime.llm_backend=vllm", "--greedy"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting the vLLM server" in done.stderr and "Answer: " in done.stdout
    assert _servers_of(files["llm"]) == [server.process.pid], "the CLI left its vLLM server running"


def test_check_reports_backend_and_reachability(files, server, capsys) -> None:
    from xraygpt_app.cli import main

    assert main(["check", "-c", str(files["xraygpt"]), "--set", "runtime.llm_backend=vllm",
                 "--set", f"llm_server.url={server.url}"]) == 0
    out = capsys.readouterr().out
    assert f"LLM backend: vllm: server at {server.url}: reachable, serving xraygpt-llm" in out
    assert "of the LLM only its token embeddings are counted" in out  # the memory estimate leaves the server's out
    assert main(["check", "-c", str(files["xraygpt"]), "--set", "runtime.llm_backend=vllm", "--set",
                 f"llm_server.url=http://127.0.0.1:{free_port()}"]) == 0
    assert "NOT reachable" in capsys.readouterr().out


def test_device_check_quick_dry_run_serves_with_vllm(tmp_path) -> None:
    """bench/device_check.sh --dry-run --quick: fp16, the vLLM step (from .venv-vllm) and 8-bit on the CPU."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run", "--quick", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=840, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert set(report["modes"]) == {"fp16", "8bit"} and report["agreement"] == {"skipped": "not in --quick"}
    vllm = report["vllm"]
    assert vllm["decode_1_user_tokens_per_s"] > 0 and vllm["decode_8_users_tokens_per_s"] > 0, vllm
    assert "- vLLM (float32 on cpu" in (tmp_path / "device_check.md").read_text()


def test_killed_server_mid_answer_restarts(files, remote, server, image) -> None:
    """Runs last: it kills the module's server. A plain message, zero-shot and other sessions unaffected,
    a restart after a pause, then the same answers as before."""
    from xraygpt_app.zeroshot import ZeroShotClassifier

    expected = _conversation(remote, image, QUESTIONS[:1])[0]
    session, other = remote.chat(image), remote.chat(image)
    with pytest.raises(LLMServerError, match="answer was cut"):
        for _ in session.ask_stream(QUESTIONS[0], do_sample=False, max_new_tokens=300, min_length=0):
            os.killpg(server.process.pid, signal.SIGKILL)
    assert not session.turns
    with pytest.raises(LLMServerError, match="(?i)try again in a moment"):  # while it restarts: a plain message
        other.ask(QUESTIONS[0], **GREEDY)
    zeroshot = ZeroShotClassifier.from_config(load_config(REPO / "eval_configs" / "zeroshot_tiny.yaml"), "medclip-vit")
    assert len(zeroshot.classify([image], preset="chexpert5")[0].labels) == 5
    deadline = time.monotonic() + 600
    while server.state != "ready":
        assert time.monotonic() < deadline and server.state != "failed", server.last_output()
        time.sleep(0.5)
    assert server.restarts == 1
    for chat in (session, other):
        assert chat.ask(QUESTIONS[0], **GREEDY).token_ids == expected.token_ids


def _servers_of(folder: Path) -> list[int]:
    """Pids of vLLM servers serving ``folder`` (from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and str(folder).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids
