"""The Gradio layout of the web app. Handlers live in ``handlers`` (and ``maps``), what the image panel
shows in ``display``, the API/MCP endpoints in ``tools``; this module only wires them.

One image panel (upload, examples, preview, description, generation settings) feeds three tabs:
Report chat, VQA and Zero-shot. Per-user data is a ``UserState`` in ``gr.State``. Generation
goes through Gradio's queue in one concurrency group, so a shared GPU serves one request at a
time by default and waiting users see their queue position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from . import display, maps, tools
from . import handlers as h
from . import labels as labels_for
from .services import ZEROSHOT_TITLES, Services

logger = logging.getLogger(__name__)

CSS = """
.xr-preview {display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start}
.xr-preview figure {margin: 0}
.xr-preview figcaption {font-size: 0.85em; opacity: 0.8}
.xr-disclaimer {border-left: 4px solid #d97706; padding-left: 8px}
.xr-download {font-weight: 600}
.xr-missing pre, .xr-missing code {white-space: pre-wrap; word-break: break-word}
.xr-map {margin: 0}
.xr-scale {display: flex; gap: 8px; align-items: center; font-size: 0.85em}
.xr-scale-bar {flex: 1; height: 12px; min-width: 120px; border-radius: 3px}
.xr-scale-note {font-size: 0.85em; opacity: 0.8}
.xr-loaded {overflow-wrap: anywhere}
"""
# No extension filter: DICOM from PACS often has no extension, and the radiograph loader
# decides by content and refuses anything else with a plain message.
FILE_TYPES = None
GENERATION = "generation"  # the concurrency group every model-generation event shares
ZEROSHOT = "zeroshot"


def disclaimer() -> gr.Markdown:
    """The research/education notice shown at the top of every tab."""
    return gr.Markdown(h.DISCLAIMER, elem_classes=["xr-disclaimer"])


def _missing_box(services: Services, reasons: dict[str, str], what: str) -> None:
    """What is missing, per model, as the weights layer says it (where we looked, how to get it, where to
    save it), and the commands that fetch the public files and restart with this config and its --set items."""
    if reasons:
        blocks = "\n\n".join(f"**{name}**\n\n```text\n{reason}\n```" for name, reason in reasons.items())
        fetch, serve = (h.command_line(services.config, command) for command in ("fetch", "serve"))
        gr.Markdown(f"### {what} is not available\n\n{blocks}\n\nSave manual downloads where *Save them as* "
                    f"says. The public files download with:\n\n```bash\n{fetch}\n```\n\n"
                    f"then restart the app:\n\n```bash\n{serve}\n```",
                    elem_classes=["xr-missing"])


def _assistant_missing_box(services: Services) -> None:
    title = h.family_title(services)
    _missing_box(services, {title: services.assistant_missing} if services.assistant_missing else {}, title)


def _zeroshot_reasons(services: Services) -> dict[str, str]:
    return {ZEROSHOT_TITLES.get(k, k): v for k, v in services.zeroshot_missing.items()}


def _arm(state: h.UserState | None) -> None:
    if isinstance(state, h.UserState):
        state.arm()


def _armed(trigger: Callable, state: gr.State) -> Any:
    """``trigger`` first clears the session's Stop switches outside the queue (see UserState.arm)."""
    return trigger(_arm, [state], None, queue=False, api_visibility="private")


def _generating(trigger: Callable, state: gr.State, stop: gr.Button, handler: Callable, inputs: list,
                outputs: list, options: dict[str, Any]) -> None:
    """``trigger`` -> arm the Stop switches -> Stop pressable -> ``handler`` (queued) -> Stop greyed out again,
    so Stop is live only while an answer waits or is being written."""
    def live(on: bool) -> Callable[[], gr.Button]:
        return lambda: gr.Button(interactive=on)

    armed = _armed(trigger, state)
    armed.then(live(True), None, stop, queue=False, api_visibility="private")
    armed.then(handler, inputs, outputs, **options).then(live(False), None, stop, queue=False,
                                                         api_visibility="private")


def _queued(services: Services, group: str) -> dict[str, Any]:
    """Options of a UI event that runs a model: its queue group and limit, and no public API."""
    return {"concurrency_id": group, "concurrency_limit": services.config.app.generation_concurrency,
            "api_visibility": "private"}


def _forget_session(state: h.UserState | None) -> None:
    """Gradio deleted this session's state: stop its answers and let go of its image and cache."""
    if isinstance(state, h.UserState):
        state.reset()
        state.image, state.info, state.file_name = None, {}, ""
        logger.info("session state released (idle or closed)")


def _expire_when_closed(demo: gr.Blocks, seconds: int) -> None:
    """A closed tab's state is released after the same idle limit as an open one.

    On its own Gradio keeps a disconnected session's state for an hour (in case the tab comes
    back), whatever ``time_to_live`` says: an image and a KV cache per closed tab. ``unload`` is
    Gradio's hook for a disconnect; it sets that session's grace period to the idle limit.
    """
    def on_unload(request: gr.Request) -> None:
        session = demo.state_holder.session_data.get(request.session_hash)
        if session is not None and hasattr(session, "STATE_TTL_WHEN_CLOSED"):
            session.STATE_TTL_WHEN_CLOSED = min(session.STATE_TTL_WHEN_CLOSED, seconds)
            logger.info("session closed: its state is released after %d s", seconds)

    demo.unload(on_unload)


def build_app(services: Services) -> gr.Blocks:
    """Build the whole app around already-loaded services (nothing is loaded here)."""
    app_config = services.config.app
    seconds = app_config.delete_cache_seconds
    with gr.Blocks(title="XrayGPT — chest radiograph assistant", analytics_enabled=False,
                   delete_cache=(seconds, seconds)) as demo:
        # Gradio drops a closed tab's state only after an hour; an idle limit bounds the images and
        # KV caches (about 1 GB each on the real model) that sessions hold.
        state = gr.State(None, time_to_live=app_config.session_idle_seconds, delete_callback=_forget_session)
        gr.Markdown("# XrayGPT — chest radiograph assistant\nUpload a chest X-ray (PNG, JPEG or DICOM), read a "
                    "draft report, ask follow-up questions and check zero-shot finding scores.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                image = _image_panel(services)
            with gr.Column(scale=3, min_width=320), gr.Tabs():
                with gr.Tab("Report chat", id="chat"):
                    resets = _chat_tab(services, state, image)
                with gr.Tab("VQA", id="vqa"):
                    resets += _vqa_tab(services, state, image)
                with gr.Tab("Zero-shot", id="zeroshot"):
                    resets += _zeroshot_tab(services, state)
        _wire_image(services, state, image, resets)
        _expire_when_closed(demo, app_config.session_idle_seconds)
        tools.register(demo, services, {"report": GENERATION, "ask": GENERATION, "classify": ZEROSHOT})
    demo.queue(default_concurrency_limit=app_config.generation_concurrency, max_size=app_config.queue_max_size)
    return demo


def _image_panel(services: Services) -> dict[str, Any]:
    """Upload, examples, generation settings, preview and description; returns the parts.

    Once an image is loaded the drop box gives way to the file's name and a "Replace image…" button
    in the same place; the settings sit above the preview, where they stay in sight.
    """
    config = services.config
    upload = gr.File(label="Radiograph (PNG, JPEG, TIFF, BMP, WebP or DICOM)", file_types=FILE_TYPES, type="filepath",
                     elem_id="upload")
    with gr.Row(equal_height=True):  # which file is loaded, and a way to replace it
        loaded = gr.HTML(elem_id="loaded-file", visible=False)  # no empty gap under the drop box
        replace = gr.UploadButton("Replace image…", size="sm", visible=False, elem_id="replace", scale=0)
    image_notice = gr.Markdown(elem_id="image-notice")
    with gr.Row():
        example_buttons = {name: gr.Button(f"Example: {name}", size="sm", elem_classes=["xr-example"])
                           for name in h.EXAMPLES if (h.EXAMPLES_DIR / h.EXAMPLES[name]).is_file()}
    gen = config.generation
    with gr.Accordion("Generation settings", open=False):
        sliders = [
            gr.Slider(1, max(1000, gen.max_new_tokens), value=gen.max_new_tokens, step=1, label="Max new tokens",
                      elem_id="max-new-tokens"),
            gr.Slider(0.1, 2.0, value=gen.temperature, step=0.1, label="Temperature", elem_id="temperature"),
            gr.Slider(0.1, 1.0, value=gen.top_p, step=0.05, label="Top-p", elem_id="top-p"),
            gr.Slider(1, 10, value=gen.num_beams, step=1, label="Beams", elem_id="beams"),
            gr.Checkbox(value=gen.do_sample, label="Sample (off: greedy, reproducible)", elem_id="do-sample"),
        ]
    preview = gr.HTML(elem_id="preview")
    description = gr.Markdown(elem_id="description")
    return {"upload": upload, "replace": replace, "loaded": loaded, "notice": image_notice, "preview": preview,
            "description": description,
            "sliders": sliders, "examples": example_buttons}


Resets = list[tuple[gr.components.Component, Any]]  # outputs about the image, with their empty value


def _wire_image(services: Services, state: gr.State, image: dict[str, Any], resets: Resets) -> None:
    """Upload and example buttons: decode, preview, and empty every output about the old image."""
    limits, size = services.config.image, services.config.vision.image_size
    # the loaded family's preprocessing
    view = services.assistant.input_view if services.assistant is not None else None
    outputs = [state, image["preview"], image["description"], image["notice"], image["upload"], image["loaded"],
               image["replace"], *[component for component, _ in resets]]

    def finish(result: tuple[h.UserState, str, str, str], old: h.UserState | None) -> tuple:
        new_state, preview, description, note = result
        if note:  # the old image and its results stay
            return (old, gr.skip(), gr.skip(), note, None, gr.skip(), gr.UploadButton(value=None),
                    *[gr.skip()] * len(resets))
        return (new_state, preview, description, "", gr.File(value=None, visible=False),
                gr.update(value=display.loaded_file_html(new_state.file_name), visible=True),
                gr.UploadButton(value=None, visible=True),
                *[dict(empty) if isinstance(empty, dict) else empty for _, empty in resets])  # Gradio pops update keys

    def on_upload(file: dict | None, old: h.UserState | None) -> tuple:
        if not file or not file.get("path"):
            return tuple(gr.skip() for _ in outputs)
        data = h.read_upload(file["path"], get_upload_folder())
        name = file.get("orig_name") or Path(file["path"]).name
        return finish(h.load_image(old, data, limits, size, name, view), old)

    # preprocess=False: the handler gets the upload's FileData; gr.File's own preprocessing (type="filepath")
    # leaves an empty NamedTemporaryFile in the cache per upload that delete_cache never removes.
    for box in (image["upload"], image["replace"]):
        box.upload(on_upload, [box, state], outputs, api_visibility="private", concurrency_limit=None,
                   preprocess=False)
    for name, button in image["examples"].items():
        button.click(lambda old, name=name: finish(h.load_example(old, name, limits, size, view), old), [state],
                     outputs, api_visibility="private", concurrency_limit=None)


def _chat_tab(services: Services, state: gr.State, image: dict[str, Any]) -> Resets:
    ready = services.assistant is not None  # without a model the buttons that ask it are greyed out
    disclaimer()
    _assistant_missing_box(services)
    gr.Markdown(h.model_line(services), elem_id="model-line")
    chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot", buttons=["copy"],
                         placeholder=h.chat_placeholder(False, services))
    with gr.Row():
        question = gr.Textbox(placeholder="Ask a follow-up question…", show_label=False, scale=4, elem_id="question",
                              interactive=ready)
        ask_button = gr.Button("Ask", scale=1, elem_id="ask", interactive=ready)
    with gr.Row():
        report_button = gr.Button("Generate report", variant="primary", elem_id="generate-report", interactive=ready)
        stop_button = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)  # live while writing
        regenerate_button = gr.Button("Regenerate", elem_id="regenerate", interactive=ready)
        clear_button = gr.Button("Clear", elem_id="clear")
    chat_notice = gr.Markdown(elem_id="chat-notice")
    download = gr.HTML(elem_id="download")
    outputs = [chatbot, state, chat_notice, download]
    sliders = image["sliders"]
    group = _queued(services, GENERATION)

    def on_report(st: h.UserState | None, *values: Any):
        yield from h.generate_report(st, services, h.generation_kwargs(*values))

    def on_ask(st: h.UserState | None, text: str, *values: Any):
        if not (text or "").strip():
            yield gr.skip(), st, h.notice("Type a question first."), gr.skip(), gr.skip()
            return
        before = len(st.messages) if st else 0
        for out in h.ask(st, services, text, h.generation_kwargs(*values)):
            yield (*out, "" if len(out[0]) > before else gr.skip())  # a refused question stays in the box

    def on_regenerate(st: h.UserState | None, *values: Any):
        yield from h.regenerate(st, services, h.generation_kwargs(*values))

    _generating(report_button.click, state, stop_button, on_report, [state, *sliders], outputs, group)
    for trigger in (ask_button.click, question.submit):
        _generating(trigger, state, stop_button, on_ask, [state, question, *sliders], [*outputs, question], group)
    _generating(regenerate_button.click, state, stop_button, on_regenerate, [state, *sliders], outputs, group)
    stop_button.click(h.stop, [state], None, queue=False, api_visibility="private")
    def on_clear(st: h.UserState | None) -> tuple:
        messages, st, note, link = h.clear_chat(st)
        return gr.update(value=messages, placeholder=h.chat_placeholder(st.image is not None, services)), st, note, link

    for trigger in (clear_button.click, chatbot.clear):  # the chatbot's own bin icon clears the state too
        trigger(on_clear, [state], outputs, queue=False, api_visibility="private")
    # a new image empties the chat, whose placeholder then says what to do with it
    emptied = gr.update(value=[], placeholder=h.chat_placeholder(True, services))
    return [(chatbot, emptied), (chat_notice, ""), (download, ""), *_answer_map_block(services, state, "chat")]


def _map_view(state: gr.State, prefix: str) -> tuple[gr.Slider, gr.HTML, gr.Markdown, gr.State, Resets]:
    """Opacity slider, overlay and notice of a map; the slider re-blends the kept map without the model."""
    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Map opacity", elem_id=f"{prefix}-map-opacity")
    view = gr.HTML(elem_id=f"{prefix}-map")
    map_notice = gr.Markdown(elem_id=f"{prefix}-map-notice")
    kept = gr.State(None)
    opacity.change(maps.restyle, [state, kept, opacity], view, queue=False, api_visibility="private")
    return opacity, view, map_notice, kept, [(view, ""), (map_notice, ""), (kept, None)]


def _answer_map_block(services: Services, state: gr.State, prefix: str) -> Resets:
    """"Where did it look?": a heatmap of an answer (chat: pick one; VQA: the last), or of some of its words."""
    with gr.Accordion("Where did it look? (heatmap of an answer)", open=False):
        with gr.Row():
            answer = gr.Number(value=0, precision=0, minimum=0, label="Answer number (0 = the last)",
                               elem_id=f"{prefix}-map-answer", visible=prefix == "chat")
            span = gr.Textbox(label="Words of that answer (empty: the whole answer)", elem_id=f"{prefix}-map-span")
        show = gr.Button("Where did it look?", elem_id=f"{prefix}-map-show", interactive=services.assistant is not None)
        opacity, view, map_notice, kept, resets = _map_view(state, prefix)

    def on_show(st: h.UserState | None, number: float | None, words: str, alpha: float):
        if prefix == "vqa":
            return maps.vqa_map(st, services, words, alpha)
        return maps.report_map(st, services, number, words, alpha)

    show.click(on_show, [state, answer, span, opacity], [view, kept, map_notice], **_queued(services, GENERATION))
    return resets


def _vqa_tab(services: Services, state: gr.State, image: dict[str, Any]) -> Resets:
    ready = services.assistant is not None
    disclaimer()
    _assistant_missing_box(services)
    gr.Markdown("One question at a time about the uploaded image; each answer starts a fresh conversation.")
    question = gr.Textbox(label="Question", placeholder="e.g. Is there evidence of pleural effusion?",
                          elem_id="vqa-question", interactive=ready)
    suggested = gr.Examples([[q] for q in h.SUGGESTED_QUESTIONS], inputs=[question], label="Suggested questions",
                            api_visibility="private")
    with gr.Row():
        ask_button = gr.Button("Answer", variant="primary", elem_id="vqa-ask", interactive=ready)
        stop_button = gr.Button("Stop", variant="stop", elem_id="vqa-stop", interactive=False)
    answer = gr.Markdown(elem_id="vqa-answer", container=True, min_height=80)
    vqa_notice = gr.Markdown(elem_id="vqa-notice")

    def on_answer(st: h.UserState | None, text: str, *values: Any):
        if not (text or "").strip():
            yield gr.skip(), h.notice("Type a question first.")
            return
        yield from h.vqa_answer(st, services, text, h.generation_kwargs(*values))

    # one click on a suggested question fills the box and asks it
    for trigger in (ask_button.click, question.submit, suggested.load_input_event.then):
        _generating(trigger, state, stop_button, on_answer, [state, question, *image["sliders"]],
                    [answer, vqa_notice], _queued(services, GENERATION))
    stop_button.click(h.stop, [state], None, queue=False, api_visibility="private")
    return [(answer, ""), (vqa_notice, ""), *_answer_map_block(services, state, "vqa")]


def _zeroshot_tab(services: Services, state: gr.State) -> Resets:
    disclaimer()
    choices = h.model_choices(services)
    missing = services.zeroshot_missing
    if not choices and not services.config.zeroshot.models:  # nothing to fetch: the config names none
        gr.Markdown("### Zero-shot classification is not available\n\nThis config names no zero-shot model "
                    "(`zeroshot.models`); `eval_configs/xraygpt_eval.yaml` shows how to add them.",
                    elem_classes=["xr-missing"])
        return []
    if not choices:
        _missing_box(services, _zeroshot_reasons(services), "Zero-shot classification")
        return []
    if missing:
        with gr.Accordion(f"Models not available here ({len(missing)})", open=False):
            _missing_box(services, _zeroshot_reasons(services), "Some zero-shot models")
    default = services.config.zeroshot.default_model
    first = default if default in services.classifiers else choices[0][1]
    controls = labels_for.controls(services, first)
    with gr.Row():
        model = gr.Dropdown(choices, value=first, label="Model", elem_id="zs-model")
        preset = gr.Radio(controls["presets"], value=controls["preset"], label="Labels", elem_id="zs-preset")
    entities = gr.Dropdown(controls["entities"], value=[], multiselect=True, visible=bool(controls["entities"]),
                           label="MedKLIP entities (type to search; with “Custom labels”)", elem_id="zs-entities")
    labels = gr.Textbox(label="Custom labels (comma-separated, used with “Custom labels”; MedKLIP: a new finding as"
                              " 'name: what it looks like' on its own line)",
                        placeholder="e.g. pneumonia, pleural effusion, no finding", elem_id="zs-labels", lines=2)
    run = gr.Button("Classify", variant="primary", elem_id="zs-run")
    zs_notice = gr.Markdown(elem_id="zs-notice")
    # sort="-y" is fixed here: a per-result gr.BarPlot(value=..., sort=...) update drew the previous result.
    chart = gr.BarPlot(x="label", y="probability", label=controls["chart"], sort="-y",
                       y_lim=[0, 1], x_label_angle=-35, elem_id="zs-chart")  # angled: phones are narrow
    table = gr.Dataframe(headers=["label", "probability", "logit", "sigmoid score"], label="Raw scores",
                         interactive=False, elem_id="zs-table")

    with gr.Row():
        map_label = gr.Dropdown([], label="Label to map", elem_id="zs-map-label", scale=3)
        method = gr.Radio([("The model's own map", "own"), ("Grad-CAM (to compare)", "grad-cam")], value="own",
                          label="Map", elem_id="zs-map-method", scale=2)
        show = gr.Button("Show map", elem_id="zs-map-show", scale=1)
    opacity, view, map_notice, kept, map_resets = _map_view(state, "zs")

    def on_model(name: str):
        found = labels_for.controls(services, name)
        return (gr.Radio(choices=found["presets"], value=found["preset"]),
                gr.Dropdown(choices=found["entities"], value=[], visible=bool(found["entities"])),
                gr.BarPlot(label=found["chart"]))

    def on_classify(st: h.UserState | None, name: str, chosen: str, text: str, picked: list[str]):
        frame, rows, note = h.classify(st, services, name, chosen, text, picked)
        names = [row[0] for row in rows]
        # a new result never keeps the previous result's map under it (its label may not even be scored now)
        return (frame, rows, note, gr.Dropdown(choices=names, value=names[0] if names else None),
                *[empty for _, empty in map_resets])

    def on_show(st: h.UserState | None, name: str, chosen: str, text: str, picked: list[str], label: str | None,
                how: str, alpha: float):
        return maps.zeroshot_map(st, services, name, chosen, text, label, alpha, picked, None if how == "own" else how)

    model.change(on_model, [model], [preset, entities, chart], queue=False, api_visibility="private")
    run.click(on_classify, [state, model, preset, labels, entities],
              [chart, table, zs_notice, map_label, *[component for component, _ in map_resets]],
              **_queued(services, ZEROSHOT))
    show.click(on_show, [state, model, preset, labels, entities, map_label, method, opacity],
               [view, kept, map_notice], **_queued(services, ZEROSHOT))
    return [(chart, None), (table, None), (zs_notice, ""), (map_label, gr.update(choices=[], value=None)),
            *map_resets]
