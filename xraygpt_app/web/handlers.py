"""Event handlers of the web app: module-level functions over plain data and the service objects.

Nothing here imports Gradio or torch, so every handler runs in a plain test. Per-user data lives
in a ``UserState`` that the UI keeps in ``gr.State``; nothing about a conversation or an image
is ever stored in a module global. Errors meant for the user come back as notice strings.
"""

from __future__ import annotations

import base64
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import XrayGPTError
from ..families import DEFAULT_REPORT_QUESTION  # pure Python: no torch
from ..families.registry import family_spec
from ..zeroshot.prompts import split_labels
from .display import InputView, describe_image, md_text, preview_html
from .labels import CUSTOM, is_medklip, label_count, label_request
from .services import ZEROSHOT_TITLES, Services

logger = logging.getLogger(__name__)

DISCLAIMER = ("**Research and education only — not a diagnosis.** Outputs are machine-generated and can be "
              "wrong; do not use them for clinical decisions.")
SUGGESTED_QUESTIONS = (
    "Is there evidence of pleural effusion?",
    "Is the heart size normal?",
    "Are there any signs of pneumonia?",
    "Is there a pneumothorax?",
)
NO_IMAGE = "Upload a radiograph first (or pick an example)."
STOPPED_MARK = " *[stopped]*"  # after an answer cut by Stop, in the chat and the downloaded conversation
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = {
    "NIH PA (512 px)": "nih_cxr14_00000001_000_pa_512.png",
    "Hannover PA": "hannover_1479fa94_pa_640x755.png",
    "Hannover AP bedside": "hannover_00870a9c_ap_bedside_640x524.png",
}


@dataclass
class UserState:
    """One browser session: its image, its conversation and its cancel switches."""

    image: Image.Image | None = None
    info: dict[str, Any] = field(default_factory=dict)
    file_name: str = ""  # the loaded file's name, shown beside the preview; user data, never logged
    session: Any = None  # the core's ChatSession, created on the first question
    vqa_turn: Any = None  # the last VQA answer (its TurnResult, not its KV cache), kept for its heatmap
    messages: list[dict[str, str]] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    vqa_cancel: threading.Event = field(default_factory=threading.Event)
    epoch: int = 0  # bumped when the image or conversation is replaced; older streams then go quiet

    def reset(self, image: Image.Image | None = None, info: dict[str, Any] | None = None) -> None:
        """Start a new conversation (about a new image if given), stopping any running answer.

        The object is changed in place: a stream still running for the old conversation holds
        this same object, sees the new epoch and stops writing into it.
        """
        self.cancel.set()  # the old conversation's answers hold these events and stop
        self.vqa_cancel.set()
        self.cancel, self.vqa_cancel = threading.Event(), threading.Event()
        if image is not None:
            self.image, self.info = image, info or {}
        self.session, self.messages, self.vqa_turn = None, [], None
        self.epoch += 1

    def arm(self) -> None:
        """On submit, before the queue: forget earlier Stops (one pressed while queued still counts)."""
        self.cancel.clear()
        self.vqa_cancel.clear()


def generation_kwargs(max_new_tokens: float, temperature: float, top_p: float, num_beams: float,
                      do_sample: bool = True) -> dict[str, Any]:
    """The generation settings of the UI as keyword arguments for the core."""
    return {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
            "top_p": float(top_p), "num_beams": int(num_beams), "do_sample": bool(do_sample)}


def model_line(services: Services) -> str:
    """The small "model" line: which family and weights answer in the chat tabs (empty if none is loaded)."""
    if services.assistant is None:
        return ""
    return f"<small>**Model:** {md_text(services.assistant.describe())}</small>"


def family_title(services: Services) -> str:
    """How the app names the configured chat model, loaded or not."""
    return family_spec(services.config.model.family).title


def command_line(config: Any, command: str) -> str:
    """``xraygpt COMMAND`` with the config file and every ``--set`` this app was started with, shell-quoted."""
    words = ["xraygpt", command, "--config", config.source or "eval_configs/xraygpt_eval.yaml"]
    for item in config.overrides:
        words += ["--set", item]
    return shlex.join(words)


def notice(text: str) -> str:
    """A user-facing notice in Markdown (empty text clears the notice)."""
    return f"⚠️ {text}" if text else ""


# ---- images -------------------------------------------------------------------------------

def read_upload(path: str | os.PathLike, upload_root: str | os.PathLike | None) -> bytes:
    """Read an uploaded file into memory and delete Gradio's copy of it at once.

    Only files under ``upload_root`` (Gradio's upload folder) are deleted, with their folder
    when it becomes empty, so that no uploaded bytes stay on disk after decoding.
    """
    path = Path(path)
    data = path.read_bytes()
    if upload_root is not None and path.resolve().is_relative_to(Path(upload_root).resolve()):
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # not empty or already gone
    return data


def load_image(state: UserState | None, data: bytes, limits: Any = None, model_size: int = 224, name: str = "",
               input_view: InputView | None = None) -> tuple[UserState, str, str, str]:
    """Decode an upload called ``name``; returns (state, preview HTML, description Markdown, notice).

    ``input_view``: the loaded model's preview of its input (``XrayGPT.input_view``), when there is one.

    A new image starts a new conversation. A file that cannot be used leaves the previous
    image in place and returns a plain-language notice.
    """
    from ..imaging.loader import load_radiograph

    state = state or UserState()
    start = time.perf_counter()
    try:
        radiograph = load_radiograph(data, limits)
    except XrayGPTError as exc:
        logger.info("upload rejected: %d bytes (%s)", len(data), type(exc).__name__)
        return state, "", "", notice(str(exc))
    info = radiograph.info.to_dict()
    logger.info("upload decoded: %d bytes, %s %dx%d in %.3f s", len(data), info.get("format"),
                info.get("width", 0), info.get("height", 0), time.perf_counter() - start)
    state.reset(radiograph.image, info)
    state.file_name = name
    return state, preview_html(radiograph.image, model_size, input_view), describe_image(info), ""


def load_example(state: UserState | None, name: str, limits: Any = None, model_size: int = 224,
                 input_view: InputView | None = None) -> tuple[UserState, str, str, str]:
    """Load one of the bundled example radiographs by its button label."""
    if name not in EXAMPLES:
        return state or UserState(), "", "", notice(f"Unknown example {name!r}.")
    return load_image(state, (EXAMPLES_DIR / EXAMPLES[name]).read_bytes(), limits, model_size, EXAMPLES[name],
                      input_view)


# ---- report chat --------------------------------------------------------------------------

ChatOutput = tuple[list[dict[str, str]], UserState, str, str]  # messages, state, notice, download


def _chat_ready(state: UserState | None, services: Services) -> str:
    if services.assistant is None:
        return notice(services.assistant_missing or f"{family_title(services)} is not loaded.")
    if state is None or state.image is None:
        return notice(NO_IMAGE)
    return ""


def _stream(state: UserState, start: Callable[[], Iterator[str]], question: str,
            replace_last: bool) -> Iterator[ChatOutput]:
    """Stream one answer into the conversation; the final yield carries the recorded turn."""
    before = list(state.messages)  # shown again if the answer fails (a failed Regenerate keeps the old answer)
    if replace_last:
        state.messages = state.messages[:-1]
    else:
        state.messages = [*state.messages, {"role": "user", "content": question}]
    state.messages.append({"role": "assistant", "content": ""})
    began, text, epoch = time.perf_counter(), "", state.epoch
    stream = start()
    try:
        for piece in stream:
            if state.epoch != epoch:  # a new image or Clear replaced this conversation
                stream.close()
                return
            text += piece
            state.messages[-1] = {"role": "assistant", "content": text}
            yield list(state.messages), state, "", ""
    except XrayGPTError as exc:
        state.messages = before
        yield list(state.messages), state, notice(str(exc)), download_link_html(state)
        return
    if state.epoch == epoch:
        state.cancel.clear()  # this Stop was for this answer
        yield _finish_turn(state, began)


def _finish_turn(state: UserState, began: float) -> ChatOutput:
    turn = state.session.turns[-1]
    state.messages[-1] = {"role": "assistant", "content": turn.answer + (STOPPED_MARK if turn.cancelled else "")}
    logger.info("answer: %d tokens in %.2f s%s", len(turn.token_ids), time.perf_counter() - began,
                " (stopped)" if turn.cancelled else "")
    notes = []
    if turn.cancelled:
        notes.append("Generation stopped.")
    if turn.dropped_turns:
        notes.append(f"The conversation was too long for the model's context: the oldest "
                     f"{turn.dropped_turns} turn(s) were left out of this answer.")
    return list(state.messages), state, notice(" ".join(notes)), download_link_html(state)


def _refused(state: UserState | None, problem: str) -> ChatOutput:
    """The conversation unchanged, with the notice saying why nothing was asked."""
    return (list(state.messages) if state else []), state or UserState(), problem, ""


def ask(state: UserState | None, services: Services, question: str, settings: dict[str, Any]
        ) -> Iterator[ChatOutput]:
    """Ask ``question`` in the session's conversation and stream the answer into the chat."""
    problem = _chat_ready(state, services)
    if problem:
        yield _refused(state, problem)
        return
    if state.session is None:  # encodes the image once per conversation
        state.session = services.assistant.chat(state.image)
    session = state.session
    yield from _stream(state, lambda: session.ask_stream(question, cancel=state.cancel, **settings),
                       question, replace_last=False)


def generate_report(state: UserState | None, services: Services, settings: dict[str, Any]) -> Iterator[ChatOutput]:
    """Ask the report question in the conversation (a new one if there is none)."""
    yield from ask(state, services, DEFAULT_REPORT_QUESTION, settings)


def regenerate(state: UserState | None, services: Services, settings: dict[str, Any]) -> Iterator[ChatOutput]:
    """Answer the last question again, replacing the last answer."""
    problem = _chat_ready(state, services)
    if not problem and (state.session is None or not state.session.turns):
        problem = notice("There is no answer to regenerate yet.")
    if problem:
        yield _refused(state, problem)
        return
    session = state.session
    yield from _stream(state, lambda: session.regenerate(cancel=state.cancel, **settings),
                       session.turns[-1].question, replace_last=True)


def stop(state: UserState | None) -> None:
    """Ask the running generations of this session to stop (chat and VQA).

    It writes no output: the stopped answer's own last update says "Generation stopped.", and an
    output here could arrive after it and wipe that notice.
    """
    if state is not None:
        state.cancel.set()
        state.vqa_cancel.set()


def chat_placeholder(has_image: bool, services: Services) -> str:
    """What the empty chat says: the next step, for a page with or without a loaded image."""
    if services.assistant is None:
        return "No chat model is loaded: see above for what is missing."
    if not has_image:
        return "Upload a radiograph, then press **Generate report**."
    return "Image loaded: press **Generate report** for a draft report, or ask a question below."


def clear_chat(state: UserState | None) -> ChatOutput:
    """Forget the conversation but keep the image."""
    state = state or UserState()
    state.reset()
    return [], state, "", ""


def conversation_markdown(state: UserState) -> str:
    """The conversation as a Markdown document, with the disclaimer and the image description."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["# XrayGPT conversation", "", f"> {DISCLAIMER}", "", f"Exported {stamp}.", ""]
    if state.info:
        parts += ["## Image", "", describe_image(state.info), ""]
    parts += ["## Conversation", ""]
    for message in state.messages:
        who = "Question" if message["role"] == "user" else "Answer"  # as the CLI labels turns, for every family
        parts += [f"**{who}:** {message['content']}", ""]
    return "\n".join(parts)


def download_link_html(state: UserState) -> str:
    """A download link carrying the conversation as a data URL (built in memory, never on disk)."""
    if not state.messages:
        return ""
    payload = base64.b64encode(conversation_markdown(state).encode("utf-8")).decode("ascii")
    return (f'<a class="xr-download" download="xraygpt-conversation.md" '
            f'href="data:text/markdown;charset=utf-8;base64,{payload}">⬇ Download conversation (Markdown)</a>')


# ---- VQA ----------------------------------------------------------------------------------

def vqa_answer(state: UserState | None, services: Services, question: str, settings: dict[str, Any]
               ) -> Iterator[tuple[str, str]]:
    """Answer one question about the image in a fresh conversation; yields (answer, notice)."""
    problem = _chat_ready(state, services)
    if problem:
        yield "", problem
        return
    session, text, began, epoch = services.assistant.chat(state.image), "", time.perf_counter(), state.epoch
    try:
        for piece in session.ask_stream(question, cancel=state.vqa_cancel, **settings):
            if state.epoch != epoch:  # a new image: this answer is about the old one
                yield "", ""
                return
            text += piece
            yield text, ""
    except XrayGPTError as exc:
        yield "", notice(str(exc))
        return
    turn = session.turns[-1]
    state.vqa_cancel.clear()  # this Stop was for this answer
    state.vqa_turn = turn
    logger.info("vqa answer: %d tokens in %.2f s", len(turn.token_ids), time.perf_counter() - began)
    stopped = turn.cancelled
    yield turn.answer + (STOPPED_MARK if stopped else ""), notice("Generation stopped." if stopped else "")


# ---- zero-shot ----------------------------------------------------------------------------

def model_choices(services: Services) -> list[tuple[str, str]]:
    """(title, name) of the zero-shot models whose weights are loaded."""
    return [(ZEROSHOT_TITLES.get(name, name), name) for name in services.classifiers]


def parse_labels(text: str) -> list[str]:
    """Custom labels: one per line or separated by commas; blanks and repeats dropped."""
    return split_labels(text.replace("\n", ","))


def classify(state: UserState | None, services: Services, model: str, preset: str, labels_text: str,
             entities: Sequence[str] = ()) -> tuple[Any, list[list[Any]], str]:
    """Zero-shot scores for the image; returns (bar-chart frame, table rows, notice).

    ``entities``: MedKLIP entities picked in the tab, scored with the custom labels.
    """
    import pandas as pd

    empty = pd.DataFrame({"label": [], "probability": []})
    if state is None or state.image is None:
        return empty, [], notice(NO_IMAGE)
    try:
        classifier = services.classifier(model)
    except KeyError as exc:
        return empty, [], notice(str(exc.args[0]))
    request = label_request(preset, labels_text, entities)
    if preset == CUSTOM and label_count(request) < (1 if is_medklip(services, model) else 2):
        # the CLIP models rank labels against each other (softmax): one label would always score 1
        return empty, [], notice("Enter at least one label." if is_medklip(services, model) else
                                 "Enter at least two labels, separated by commas.")
    began = time.perf_counter()
    try:
        result = classifier.classify([state.image], **request)[0]
    except XrayGPTError as exc:
        return empty, [], notice(str(exc))
    logger.info("zero-shot %s: %d labels in %.2f s", model, len(result.labels), time.perf_counter() - began)
    return result_frame(result), result_rows(result), ""


def _ranked(result: Any) -> list[tuple[str, float, float, float]]:
    rows = zip(result.labels, result.probabilities, result.logits, result.scores, strict=True)
    return sorted(((str(a), float(b), float(c), float(d)) for a, b, c, d in rows), key=lambda r: -r[1])


def result_frame(result: Any) -> Any:
    """Probabilities sorted from high to low, as the bar chart's data frame."""
    import pandas as pd

    ranked = _ranked(result)
    return pd.DataFrame({"label": [r[0] for r in ranked], "probability": [round(r[1], 4) for r in ranked]})


def result_rows(result: Any) -> list[list[Any]]:
    """Table rows: label, softmax probability, raw logit, sigmoid score (sorted)."""
    return [[label, round(p, 4), round(logit, 4), round(s, 4)] for label, p, logit, s in _ranked(result)]

