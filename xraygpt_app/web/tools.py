"""The stateless API endpoints ``report``, ``ask`` and ``classify``: for gradio_client, and MCP tools with ``--mcp``.

Gradio turns each function's docstring into its API and MCP description: the summary line(s),
then one ``name: description`` line per parameter after ``Args:`` (one line each: that is what
Gradio's parser reads). The docstrings are built here from data (the config's defaults, the
loaded zero-shot models, the preset registry) so that an agent reading the tool list knows what
each tool does, what every parameter means, and that the output is not a diagnosis.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder

from ..errors import XrayGPTError
from ..families import DEFAULT_REPORT_QUESTION
from ..zeroshot.prompts import PRESETS
from . import api as ui_api
from . import handlers as h
from .services import Services

RESEARCH_ONLY = ("For research and education only: the output is machine-generated, can be wrong and is never a "
                 "diagnosis; do not use it for clinical decisions.")
IMAGE = ("The chest radiograph: PNG, JPEG, TIFF, BMP, WebP or DICOM (.dcm), as a file uploaded to this app or an "
         "https URL that this server can download (addresses on this machine or a private network are refused).")
REFUSED_URL = ("The image URL was refused: this server downloads images only from public https/http addresses "
               "(not from this machine or a private network). Upload the file instead, or pass it as a data: URL.")
UNREACHABLE_URL = "The image URL could not be downloaded ({reason}). Check the address, or upload the file instead."


def generation_params(config: Any) -> dict[str, str]:
    """Descriptions of the generation settings shared by ``report`` and ``ask`` (defaults from the config)."""
    gen = config.generation
    return {
        "max_new_tokens": f"Longest answer, in tokens (default {gen.max_new_tokens}).",
        "temperature": f"Sampling temperature; lower is more conservative (default {gen.temperature}).",
        "top_p": f"Nucleus sampling: sample only from the most likely tokens whose probabilities add up to this "
                 f"(default {gen.top_p}).",
        "num_beams": f"Beam search width; 1 streams one sampled answer (default {gen.num_beams}).",
    }


def docstring(summary: str, params: dict[str, str], returns: str) -> str:
    """A docstring in the layout Gradio reads into API/MCP descriptions."""
    lines = [summary, "", "Args:", *(f"    {name}: {text}" for name, text in params.items()), "", "Returns:",
             f"    {returns}"]
    return "\n".join(lines)


def preset_help() -> str:
    """What ``preset`` means, with every choice and its labels."""
    choices = "; ".join(f"'{key}' = {p.title} ({', '.join(p.labels)})" for key, p in PRESETS.items())
    return (f"A named label set with MedCLIP's prompt ensembles, used when `labels` is empty: {choices}.")


def describe(services: Services, report: Callable, ask: Callable, classify: Callable) -> None:
    """Give the three endpoint functions their docstrings (summary, parameters, returns)."""
    config, gen = services.config, generation_params(services.config)
    assistant = h.family_title(services)  # the configured family, not always XrayGPT
    models = ", ".join(f"'{name}'" for name in services.classifiers) or "none is loaded on this server"
    report.__doc__ = docstring(
        f"Draft a free-text radiology report for one chest X-ray with {assistant} "
        f"(asks: \"{DEFAULT_REPORT_QUESTION}\"). {RESEARCH_ONLY}", {"image": IMAGE, **gen}, "The draft report text.")
    ask.__doc__ = docstring(
        f"Answer one question about one chest X-ray with {assistant}, in a fresh conversation (no memory of earlier "
        f"calls). {RESEARCH_ONLY}",
        {"image": IMAGE, "question": "The question in plain English, e.g. 'Is there evidence of pleural effusion?'",
         **gen}, "The answer text.")
    classify.__doc__ = docstring(
        f"Zero-shot finding scores for one chest X-ray (MedCLIP or BiomedCLIP image-text similarity, no "
        f"training on these labels). {RESEARCH_ONLY}",
        {"image": IMAGE,
         "model": f"Which zero-shot model: {models} (default '{config.zeroshot.default_model}').",
         "preset": preset_help() + f" Default '{config.zeroshot.preset}'.",
         "labels": "Your own labels instead of the preset, comma-separated (e.g. 'pneumonia, pleural effusion, no "
                   "finding'); leave empty to use the preset.",
         "heatmaps": "True adds one heatmap per label (its grid of values and a small overlay PNG as a data URL): "
                     "for MedCLIP and BiomedCLIP where the label's score is most sensitive (Grad-CAM), for MedKLIP "
                     "where its entity query attended (its own grounding maps); each map names its method. "
                     "Not a segmentation, not a diagnosis (default false)."},
        "A JSON object: labels; probabilities (softmax across the labels: which label fits best); logits (the "
        "ensemble image-text logits); scores (sigmoid of each logit, for ranking images, not a chance of disease); "
        "with heatmaps=true also heatmaps, one per label.")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """An XrayGPTError (bad input) reaches the API caller as its message, with no traceback in the log."""
    try:
        yield
    except XrayGPTError as exc:
        raise gr.Error(str(exc), print_exception=False) from None


def plain_download_errors(component: Any) -> None:
    """Make a failed image-URL download a plain message for the caller of this input ``component``.

    Gradio downloads an image URL before the endpoint runs (with its SSRF guard); its errors there
    would reach the caller only as "the upstream Gradio app has raised an exception". This wraps
    that one method of this one component instance (the class is untouched).
    """
    download = component.async_move_resource_to_block_cache

    async def move_to_cache(url_or_path: Any) -> Any:
        try:
            return await download(url_or_path)
        except Exception as exc:
            if not str(url_or_path).startswith(("http://", "https://")):
                raise
            if "failed validation" in str(exc):  # safehttpx: a non-public address
                raise gr.Error(REFUSED_URL, print_exception=False) from None
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise gr.Error(UNREACHABLE_URL.format(reason=reason), print_exception=False) from None

    component.async_move_resource_to_block_cache = move_to_cache


def forget_copies(data: bytes, root: str | os.PathLike) -> int:
    """Delete every file under Gradio's cache ``root`` that holds exactly ``data``; return how many.

    Gradio's MCP layer writes an image sent as a data: URL to a file of its own before uploading a
    copy to the endpoint, and nothing ever deletes that first file. Comparing sizes first keeps
    this cheap: the cache holds next to nothing, since every upload is deleted once read.
    """
    removed = 0
    files = [Path(folder) / name for folder, _, names in os.walk(root) for name in names]  # walk first, then delete
    for path in files:
        with contextlib.suppress(OSError):  # another request may delete it first
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                path.unlink()
                removed += 1
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # its per-file folder, if now empty
    return removed


def register(demo: gr.Blocks, services: Services, concurrency: dict[str, str]) -> None:
    """Add the endpoints to ``demo`` (inside its context); ``concurrency`` maps endpoint -> queue group."""
    gen, zeroshot = services.config.generation, services.config.zeroshot
    limit = services.config.app.generation_concurrency
    upload_root = get_upload_folder()

    def read(image: FileData | dict) -> bytes:
        path = image["path"] if isinstance(image, dict) else image.path
        data = h.read_upload(path, upload_root)
        forget_copies(data, upload_root)
        return data

    def answer(image: FileData, question: str, *settings: Any) -> str:
        with user_errors():
            return ui_api.api_answer(services, read(image), question, h.generation_kwargs(*settings, gen.do_sample))

    def report(image: FileData, max_new_tokens: int = gen.max_new_tokens, temperature: float = gen.temperature,
               top_p: float = gen.top_p, num_beams: int = gen.num_beams) -> str:
        return answer(image, "", max_new_tokens, temperature, top_p, num_beams)

    def ask(image: FileData, question: str, max_new_tokens: int = gen.max_new_tokens,
            temperature: float = gen.temperature, top_p: float = gen.top_p, num_beams: int = gen.num_beams) -> str:
        return answer(image, question, max_new_tokens, temperature, top_p, num_beams)

    def classify(image: FileData, model: str = zeroshot.default_model, preset: str = zeroshot.preset,
                 labels: str = "", heatmaps: bool = False) -> dict:
        with user_errors():
            return ui_api.api_classify(services, read(image), model, preset, labels, heatmaps)

    describe(services, report, ask, classify)
    for fn in (report, ask, classify):
        name = fn.__name__
        dependency = gr.api(fn, api_name=name, concurrency_id=concurrency[name], concurrency_limit=limit)
        plain_download_errors(demo.blocks[dependency["inputs"][0]])  # the image parameter
