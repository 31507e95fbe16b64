"""Many users at once: queue wait, latency, answers and server memory of the running web app.

    python bench/bench_app_load.py [--users 8] [--sessions 50] [--midsize | --config CFG]
                                   [--max-new-tokens 20] [--idle-seconds 30] [--json]
    python bench/bench_app_load.py --llm vllm --midsize [--users 8] [--max-new-tokens 48]

Starts the app (``xraygpt serve``, the tiny real-format model by default) in a subprocess, then:

1. **Alone**: each simulated user's conversation (upload a sample from ``../shared/xray-samples``,
   *Generate report*, two follow-up questions; greedy) runs by itself, one user after another.
2. **At once**: ``--users`` clients run their conversations at the same moment, each in its own
   Gradio session. Every answer must equal the same user's answer from step 1 (no cross-talk).
3. **In a row**: ``--sessions`` short sessions (upload + report) one after another; the server's
   resident memory is sampled, and after the idle limit (``app.session_idle_seconds``, set to
   ``--idle-seconds`` here) the log must show every session's state released (image, chat and KV cache).

The clients are ``gradio_client`` sessions calling the same queued events the browser calls (the
UI's events are private, left out of the API docs; the bench marks them callable in its own
client). Queue wait is from submit (an upload includes sending the file) until the server starts
the event; end-to-end is from submit until the last output. Memory is the server process's RSS from ``/proc``.

``--llm vllm`` compares the LLM backends in one run instead: the same app and users, first with the LLM
in process (``runtime.llm_backend: transformers``, one generation at a time), then on a vLLM server the
app launches from ``.venv-vllm`` (``runtime.llm_backend: vllm``, ``app.generation_concurrency`` 16). Per
backend: steps 1 and 2, then aggregate tokens/s (tokens of every answer in step 2, from the app's log, over
its wall time), time to first token (submit until the first streamed text) and end-to-end p50/p95 of the
report and ask requests, and whether every answer equals the solo run's (and the other backend's).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from _app_server import running_app  # noqa: E402  (tests/ starts the app the same way)

SAMPLES = REPO.parent / "shared" / "xray-samples"

QUESTIONS = ("Is there evidence of pleural effusion?", "Is the heart size normal?")
EVENTS = ("on_upload", "on_report", "on_ask")  # the UI handlers' names, Gradio's default event names
WAITING = {"STARTING", "JOINING_QUEUE", "IN_QUEUE", "SENDING_DATA"}  # before the server runs the event
RELEASED = "session state released"  # what web/ui.py logs when the idle sweep frees a session
CLOSED = "session closed"  # ...and when Gradio tells it a client has gone (no heartbeat)


@dataclass
class Request:
    """One queued event of one user: what it was, and its timings in seconds."""

    kind: str
    queue_wait: float
    end_to_end: float
    first_output: float | None = None  # submit until the first streamed output (text of a report or answer)


@dataclass
class UserRun:
    """One simulated user's conversation: answers in order, and the timings of its requests."""

    sample: str
    answers: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    error: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="simulated users at once (default 8)")
    parser.add_argument("--sessions", type=int, default=50, help="sessions in a row for the memory check")
    parser.add_argument("--config", type=Path, default=None, help="app config (default: the tiny fixture)")
    parser.add_argument("--midsize", action="store_true", help="serve the mid-size random model (bench/midsize.py)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--idle-seconds", type=int, default=30,
                        help="app.session_idle_seconds of the server: longer than any queue wait here")
    parser.add_argument("--capacity", type=int, default=None,
                        help="app.session_capacity of the server: sessions whose Gradio-side copies are kept")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="GRADIO_HEARTBEAT_INTERVAL of the server: how soon a closed client is noticed "
                             "(Gradio's default 15 s)")
    parser.add_argument("--llm", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: compare the in-process LLM with a vLLM server in one run (see above)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser.parse_args(argv)


def chest_samples(count: int) -> list[Path]:
    """``count`` different chest radiographs from the shared samples (smallest first), cycling if needed."""
    with (SAMPLES / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row["body_part"] == "chest" and "ultrasound" not in row["modality"].lower()]
    files = [SAMPLES / row["filename"] for row in sorted(rows, key=lambda row: int(row["size_bytes"]))]
    return [files[i % len(files)] for i in range(count)]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def open_session(url: str) -> tuple[Any, dict[str, int]]:
    """A new client (its own Gradio session) and the fn_index of each UI event it calls."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    events = {d["api_name"]: d["id"] for d in client.config["dependencies"] if d.get("api_name") in EVENTS}
    missing = set(EVENTS) - set(events)
    if missing:
        raise RuntimeError(f"the app has no event named {sorted(missing)}")
    for index in events.values():
        client.endpoints[index].is_valid = True  # private in the API docs; the browser calls them the same way
    return client, events


def timed(client: Any, fn_index: int, kind: str, *args: Any) -> tuple[Any, Request]:
    """Submit one event and wait for it, noting when the server started it."""
    start = time.perf_counter()
    job = client.submit(*args, fn_index=fn_index)
    started = first = None
    while not job.done():
        if started is None and job.status().code.name not in WAITING:
            started = time.perf_counter()
        if first is None and job.outputs():
            first = time.perf_counter() - start
        time.sleep(0.005)
    result = job.result()
    end = time.perf_counter()
    return result, Request(kind, (started or end) - start, end - start, first)


def last_answer(messages: list[Any]) -> str:
    """The text of the last assistant message of a Chatbot value."""
    message = messages[-1]
    content = message["content"] if isinstance(message, dict) else message.content
    if isinstance(content, list):  # Gradio 6 sends a list of typed parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def conversation(url: str, sample: Path, settings: list[Any], barrier: threading.Barrier | None = None) -> UserRun:
    """Upload, report, two follow-ups in one new session; greedy ``settings`` (the five sliders)."""
    from gradio_client import handle_file

    run = UserRun(sample.name)
    try:
        client, events = open_session(url)
        if barrier is not None:
            barrier.wait()
        _, request = timed(client, events["on_upload"], "upload", handle_file(str(sample)))
        run.requests.append(request)
        steps = [("report", events["on_report"], ())] + [("ask", events["on_ask"], (q,)) for q in QUESTIONS]
        for kind, index, question in steps:
            result, request = timed(client, index, kind, *question, *settings)
            run.requests.append(request)
            if result[1]:  # the chat notice: nothing should go wrong here
                raise RuntimeError(f"{kind}: {result[1]}")
            run.answers.append(last_answer(result[0]))
        client.close()
    except Exception as exc:  # noqa: BLE001 - one user's failure is reported, not fatal to the others
        run.error = f"{type(exc).__name__}: {exc}"
    return run


def at_once(url: str, samples: list[Path], settings: list[Any]) -> tuple[list[UserRun], float]:
    """Every user's conversation at the same moment, one thread each; returns the runs and the wall time."""
    runs: list[UserRun | None] = [None] * len(samples)
    barrier = threading.Barrier(len(samples))

    def user(i: int) -> None:
        runs[i] = conversation(url, samples[i], settings, barrier)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(samples))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs, time.perf_counter() - start


def in_a_row(url: str, pid: int, samples: list[Path], settings: list[Any], sessions: int) -> list[tuple[int, float]]:
    """``sessions`` short sessions (upload + report) one after another; RSS after every tenth."""
    from gradio_client import handle_file

    memory = []
    for i in range(sessions):
        client, events = open_session(url)
        timed(client, events["on_upload"], "upload", handle_file(str(samples[i % len(samples)])))
        timed(client, events["on_report"], "report", *settings)
        client.close()
        if (i + 1) % 10 == 0 or i + 1 == sessions:
            memory.append((i + 1, rss_mib(pid)))
    return memory


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_rows(runs: list[UserRun]) -> list[dict[str, Any]]:
    """p50/p95 of queue wait and end-to-end latency per kind of request (and over all of them)."""
    requests = [r for run in runs for r in run.requests]
    rows = []
    for kind in ("upload", "report", "ask", "all"):
        chosen = [r for r in requests if kind in ("all", r.kind)]
        if chosen:
            waits, totals = [r.queue_wait for r in chosen], [r.end_to_end for r in chosen]
            rows.append({"request": kind, "n": len(chosen), "queue_p50": percentile(waits, 50),
                         "queue_p95": percentile(waits, 95), "e2e_p50": percentile(totals, 50),
                         "e2e_p95": percentile(totals, 95)})
    return rows


def released_count(log: str) -> int:
    """How many session states the idle sweep has released so far (from the server log)."""
    return log.count(RELEASED)


def wait_for_release(server: Any, expected: int, timeout: float) -> int:
    """Wait until the log shows ``expected`` releases (or ``timeout`` seconds); return the count."""
    deadline = time.monotonic() + timeout
    while released_count(server.log()) < expected and time.monotonic() < deadline:
        time.sleep(1)
    return released_count(server.log())


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the three phases against one server and collect every figure."""
    config = args.config
    if args.midsize:
        import midsize

        config = midsize.build_midsize(workdir / "midsize")
    settings = [args.max_new_tokens, 1.0, 0.9, 1, False]  # max tokens, temperature, top-p, beams, greedy
    samples = chest_samples(args.users)
    command = ["-m", "xraygpt_app.cli", "--verbose", "serve", "--set", f"app.session_idle_seconds={args.idle_seconds}"]
    if args.capacity:
        command += ["--set", f"app.session_capacity={args.capacity}"]
    extra = {"config": config} if config else {}
    env = {"GRADIO_HEARTBEAT_INTERVAL": str(args.heartbeat)} if args.heartbeat else {}
    with running_app(workdir, command, env, **extra) as server:
        result: dict[str, Any] = {"users": args.users, "model": str(config or "tiny fixture"),
                                  "rss_start_mib": rss_mib(server.pid)}
        alone = [conversation(server.url, sample, settings) for sample in samples]
        result["rss_after_alone_mib"] = rss_mib(server.pid)
        runs, wall = at_once(server.url, samples, settings)
        result["rss_after_at_once_mib"] = rss_mib(server.pid)
        result.update(_compare(alone, runs), wall_s=wall, latency=latency_rows(runs))
        opened = 2 * len(samples)
        result["released_after_at_once"] = wait_for_release(server, opened, args.idle_seconds + 15)
        result["rss_after_sweep_mib"] = rss_mib(server.pid)
        result["in_a_row_rss_mib"] = in_a_row(server.url, server.pid, samples, settings, args.sessions)
        opened += args.sessions
        result["sessions_opened"] = opened
        result["released_total"] = wait_for_release(server, opened, args.idle_seconds + 15)
        result["rss_end_mib"] = rss_mib(server.pid)
        result["closed_total"] = server.log().count(CLOSED)
    return result


def _compare(alone: list[UserRun], runs: list[UserRun]) -> dict[str, Any]:
    errors = [f"{run.sample}: {run.error}" for run in [*alone, *runs] if run.error]
    same = [a.answers == b.answers and not a.error and not b.error for a, b in zip(alone, runs, strict=True)]
    distinct = len({tuple(run.answers) for run in alone})
    return {"errors": errors, "same_as_alone": sum(same), "distinct_conversations": distinct}


def print_tables(result: dict[str, Any]) -> None:
    print(f"model: {result['model']}; {result['users']} users at once, each: upload, report, 2 follow-ups "
          f"(greedy); wall time {result['wall_s']:.1f} s")
    print("\n| request | n | queue wait p50 | p95 | end-to-end p50 | p95 |\n| --- | --- | --- | --- | --- | --- |")
    for row in result["latency"]:
        print(f"| {row['request']} | {row['n']} | {row['queue_p50']:.2f} s | {row['queue_p95']:.2f} s | "
              f"{row['e2e_p50']:.2f} s | {row['e2e_p95']:.2f} s |")
    print(f"\nanswers equal to the same conversation run alone: {result['same_as_alone']}/{result['users']} users "
          f"({result['distinct_conversations']} distinct conversations); errors: {len(result['errors'])}")
    for error in result["errors"]:
        print(f"  {error}")
    print("\n| server RSS | MiB |\n| --- | --- |")
    for key, label in (("rss_start_mib", "after start"), ("rss_after_alone_mib", "after the users one by one"),
                       ("rss_after_at_once_mib", "after the users at once"),
                       ("rss_after_sweep_mib", "after the idle sweep")):
        print(f"| {label} | {result[key]:.0f} |")
    for count, mib in result["in_a_row_rss_mib"]:
        print(f"| after {count} more sessions in a row | {mib:.0f} |")
    print(f"| after the idle sweep | {result['rss_end_mib']:.0f} |")
    print(f"\nsession states released by the idle sweep: {result['released_total']} of "
          f"{result['sessions_opened']} sessions opened ({result['closed_total']} seen closed by the server first)")


ANSWER_LOG = re.compile(r"answer: (\d+) tokens in")  # what web/handlers.py logs per answer (--verbose)


def backend_run(args: argparse.Namespace, workdir: Path, config: Path, backend: str) -> dict[str, Any]:
    """Solo and at-once conversations against an app whose LLM runs as ``backend`` says."""
    settings = [args.max_new_tokens, 1.0, 0.9, 1, False]
    samples = chest_samples(args.users)
    command = ["-m", "xraygpt_app.cli", "--verbose", "serve", "--set", f"runtime.llm_backend={backend}"]
    env = {"VLLM_CACHE_ROOT": str(workdir / "vllm-cache")}
    with running_app(workdir / backend, command, env, config=config) as server:
        alone = [conversation(server.url, sample, settings) for sample in samples]
        logged = len(ANSWER_LOG.findall(server.log()))
        runs, wall = at_once(server.url, samples, settings)
        tokens = sum(int(n) for n in ANSWER_LOG.findall(server.log())[logged:])
    answers = [r for run in runs for r in run.requests if r.kind != "upload"]
    firsts = [r.first_output for r in answers if r.first_output is not None] or [float("nan")]
    ends = [r.end_to_end for r in answers]
    return {"backend": backend, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50": percentile(firsts, 50), "ttft_p95": percentile(firsts, 95),
            "e2e_p50": percentile(ends, 50), "e2e_p95": percentile(ends, 95), **_compare(alone, runs),
            "answers": [run.answers for run in alone]}


def compare_backends(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The in-process LLM and a vLLM server behind the same app, one after the other, in this run."""
    import midsize

    config = args.config or (midsize.build_midsize(workdir / "midsize") if args.midsize else None)
    config = config or REPO / "eval_configs" / "tiny_fixture.yaml"
    rows = [backend_run(args, workdir, config, backend) for backend in ("transformers", "vllm")]
    return {"users": args.users, "model": str(config), "max_new_tokens": args.max_new_tokens, "rows": rows,
            "same_across_backends": rows[0]["answers"] == rows[1]["answers"]}


def print_backends(result: dict[str, Any]) -> None:
    print(f"model: {result['model']}; {result['users']} users at once, each: upload, report, 2 follow-ups "
          f"(greedy, max {result['max_new_tokens']} new tokens)")
    print("\n| LLM backend | tokens | wall | aggregate tokens/s | TTFT p50 | TTFT p95 | end-to-end p50 | p95 |"
          " equal to solo |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in result["rows"]:
        print(f"| {row['backend']} | {row['tokens']} | {row['wall_s']:.1f} s | {row['tokens_per_s']:.1f} |"
              f" {row['ttft_p50']:.2f} s | {row['ttft_p95']:.2f} s | {row['e2e_p50']:.2f} s | {row['e2e_p95']:.2f} s |"
              f" {row['same_as_alone']}/{result['users']} |")
    speedup = result["rows"][1]["tokens_per_s"] / result["rows"][0]["tokens_per_s"]
    print(f"\nvLLM / in process, aggregate tokens/s: {speedup:.2f}x; answers equal across backends:"
          f" {result['same_across_backends']}")
    for row in result["rows"]:
        for error in row["errors"]:
            print(f"  {row['backend']}: {error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run, show = (compare_backends, print_backends) if args.llm == "vllm" else (bench, print_tables)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as folder:
        result = run(args, Path(folder))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        show(result)
    if args.llm == "vllm":
        return 0 if all(not r["errors"] and r["same_as_alone"] == args.users for r in result["rows"]) else 1
    ok = not result["errors"] and result["same_as_alone"] == result["users"]
    return 0 if ok and result["released_total"] == result["sessions_opened"] else 1


if __name__ == "__main__":
    sys.exit(main())
