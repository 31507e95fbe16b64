"""Report maps: which image patches the log-probability of some words of an answer is most sensitive to.

Method (the default and only one): **gradient x input, pooled per ViT patch**. The recorded turn is
replayed with teacher forcing -- the exact prompt segments and generated token ids of its
:class:`~xraygpt_app.chat.TurnResult`, the image through the model's own ``ChatModel.image_tokens``
(XrayGPT: EVA ViT -> Q-Former -> projection; llava family: the open_clip tower's patch tokens ->
projector) -- and the summed log-probability of the chosen tokens is differentiated with
respect to the preprocessed pixels. Per ViT patch (XrayGPT: 16 x 16 patches of 14 px at 224; llava
with BiomedCLIP: 14 x 14 patches of 16 px), grad . pixels is summed: since the patch embedding is
linear, this equals
grad . (patch token - the token of a mean-intensity patch), a first-order estimate of how much the
words' log-probability falls if that patch were replaced by the mean intensity (0 after
normalisation, what the deletion check does).

What it does not mean: it is local and first-order (patches that matter only together, or
non-linearly, can be missed); it explains the model's raw log-probability (temperature 1, before
top-p), not why sampling picked the words; it is not a segmentation and not a diagnosis.
Generation is never touched: the replay is a separate forward/backward pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..chat import ChatSession, TurnResult
from ..errors import BadInputError
from ..families import ChatModel
from ..imaging.loader import model_ready
from .geometry import InputGeometry, torchvision_geometry
from .maps import Heatmap, frozen, make_heatmap

log = logging.getLogger(__name__)
METHOD = "gradient x input per ViT patch (baseline: mean intensity)"


@dataclass(frozen=True)
class ImagePath:
    """How a model family turns an image into LLM input tokens, and where its patches lie."""

    preprocess: Callable[[Image.Image], torch.Tensor]  # -> (1, 3, S, S), the family's own transform
    llm_tokens: Callable[[torch.Tensor], torch.Tensor]  # pixels -> (1, image tokens, hidden), differentiable
    patch: int  # pixels per ViT patch side
    geometry: Callable[[int, int], InputGeometry]


def image_path(model: ChatModel) -> ImagePath:
    """The :class:`ImagePath` of a loaded chat model (any family), from its own interface."""
    def llm_tokens(pixels: torch.Tensor) -> torch.Tensor:
        return model.image_tokens(pixels).to(model.placement.llm_dtype)
    return ImagePath(model.preprocess, llm_tokens, model.patch_size,
                     lambda w, h: torchvision_geometry(w, h, model.preprocess_transform))


def _stop_text(model: ChatModel) -> str:
    template = getattr(model, "template", None)
    return (template.end_of_turn if template is not None else model.config.generation.stop_string) or ""


def token_offsets(model: ChatModel, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded answer text and each token's character range in it (by decoding growing prefixes)."""
    decode = model.decode
    text, ends = "", []
    for k in range(len(token_ids)):
        text = decode(token_ids[:k + 1])
        ends.append(len(text))
    starts = [0, *ends[:-1]]
    return text, [(min(s, e), e) for s, e in zip(starts, ends, strict=True)]


def span_token_indices(model: ChatModel, token_ids: list[int], span: str | None) -> tuple[list[int], str]:
    """Indices of the generated tokens that spell ``span`` (case-insensitive, first match) and its text.

    Without a span: every token of the answer before the stop string, without end-of-sequence.
    """
    text, offsets = token_offsets(model, token_ids)
    stop_text = _stop_text(model)
    stop = text.find(stop_text) if stop_text else -1
    cut = len(text) if stop < 0 else stop
    eos = model.tokenizer.eos_token_id
    if span is None or not span.strip():
        chosen = [k for k, (start, end) in enumerate(offsets) if start < cut and end > start and token_ids[k] != eos]
        label = text[:cut].strip()
    else:
        where = text[:cut].lower().find(span.strip().lower())
        if where < 0:
            raise BadInputError(f"{span.strip()!r} does not occur in this answer")
        lo, hi = where, where + len(span.strip())
        chosen = [k for k, (start, end) in enumerate(offsets) if start < hi and end > lo]
        label = text[lo:hi]
    if not chosen:
        raise BadInputError("this answer has no words to explain")
    return chosen, label


def teacher_forced_logprobs(model: ChatModel, pixel_values: torch.Tensor, turn: TurnResult,
                            upto: int) -> torch.Tensor:
    """(upto + 1, vocab) log-probabilities of answer tokens 0..upto given the image, the turn's prompt and the
    answer before each token (teacher forcing on the recorded tokens; differentiable w.r.t. ``pixel_values``)."""
    if len(turn.prompt_segment_ids) != 2:
        raise BadInputError("this turn does not record its prompt segments")
    ids_before, ids_after = turn.prompt_segment_ids
    device = model.placement.llm_device
    embed = model.llm.get_input_embeddings()
    image = image_path(model).llm_tokens(pixel_values)
    before = embed(torch.tensor([ids_before], device=device))
    after = embed(torch.tensor([ids_after + list(turn.token_ids[:upto])], device=device))
    logits = model.llm(inputs_embeds=torch.cat([before, image, after], dim=1), use_cache=False).logits
    first = before.shape[1] + image.shape[1] + len(ids_after) - 1  # the position that predicts answer token 0
    return logits[0, first:first + upto + 1].float().log_softmax(dim=-1)


def span_logprob(model: ChatModel, pixel_values: torch.Tensor, turn: TurnResult,
                 indices: list[int]) -> torch.Tensor:
    """Summed log-probability of ``turn.token_ids[indices]`` given the image (differentiable)."""
    logprobs = teacher_forced_logprobs(model, pixel_values, turn, max(indices))
    picked = torch.tensor(indices, device=logprobs.device)
    targets = torch.tensor([turn.token_ids[k] for k in indices], device=logprobs.device)
    return logprobs[picked, targets].sum()


def patch_attribution(pixel_grad: torch.Tensor, pixels: torch.Tensor, patch: int) -> np.ndarray:
    """(S/patch, S/patch) sum of grad x pixels over each patch and channel."""
    product = (pixel_grad * pixels)[0].sum(dim=0)  # (S, S)
    side = product.shape[0] // patch
    return product.reshape(side, patch, side, patch).sum(dim=(1, 3)).detach().cpu().numpy()


@contextlib.contextmanager
def _all_frozen(model: ChatModel):
    with contextlib.ExitStack() as stack:
        for part in model.parts().values():
            stack.enter_context(frozen(part))
        stack.enter_context(torch.enable_grad())
        yield


def report_grid(model: ChatModel, pixel_values: torch.Tensor, turn: TurnResult,
                indices: list[int]) -> tuple[np.ndarray, float]:
    """The raw gradient x input patch grid of the chosen tokens (16 x 16 for XrayGPT), and their log-probability."""
    with _all_frozen(model):
        pixels = pixel_values.detach().clone().float().requires_grad_(True)
        target = span_logprob(model, pixels, turn, indices)
        with warnings.catch_warnings():  # bitsandbytes' 4-bit kernels warn that they have no backward
            warnings.simplefilter("ignore", UserWarning)
            (grad,) = torch.autograd.grad(target, pixels)
    if not torch.any(grad):  # e.g. bitsandbytes' 4-bit layers pass no gradient back: refuse, never a blank map
        raise BadInputError(f"no gradient reaches the image in runtime mode {model.placement.mode!r}"
                            " (bitsandbytes 4-bit layers have no backward pass): report maps need fp32, fp16,"
                            " bf16 or 8-bit")
    return patch_attribution(grad, pixels, image_path(model).patch), float(target.detach())


def _turn_of(session: ChatSession, turn: int | TurnResult) -> TurnResult:
    if isinstance(turn, TurnResult):
        return turn
    if not session.turns:
        raise BadInputError("there is no answer to explain yet")
    try:
        return session.turns[turn]
    except IndexError:
        raise BadInputError(f"there is no turn {turn} (this conversation has {len(session.turns)})") from None


def report_heatmap(session: ChatSession, image: Image.Image, turn: int | TurnResult = -1,
                   span: str | None = None) -> Heatmap:
    """Where the model looked for ``span`` (or the whole answer) of a turn of ``session`` about ``image``."""
    model, result = session.model, _turn_of(session, turn)
    pixel_values = image_path(model).preprocess(model_ready(image))
    if not torch.allclose(pixel_values, session.encoding.pixel_values.cpu(), atol=1e-4):
        raise BadInputError("this image is not the one the conversation is about")
    return turn_heatmap(model, image, result, span)


def turn_heatmap(model: ChatModel, image: Image.Image, turn: TurnResult, span: str | None = None) -> Heatmap:
    """As :func:`report_heatmap`, from a recorded turn alone (the caller vouches that it is about ``image``)."""
    started = time.perf_counter()
    image = model_ready(image)
    path = image_path(model)
    indices, label = span_token_indices(model, turn.token_ids, span)
    grid, target = report_grid(model, path.preprocess(image), turn, indices)
    heatmap = make_heatmap(label, grid, path.geometry(image.width, image.height), METHOD,
                           model.config.model.family, target)
    log.info("report map of %d tokens in %.2f s", len(indices), time.perf_counter() - started)
    return heatmap
