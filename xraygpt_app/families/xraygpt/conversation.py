"""XrayGPT's conversation template and answer clean-up: pure Python, no torch.

The prompt is ``system###`` then ``Role: text###`` per message and ``Doctor:`` for the open
slot (``CONV_VISION`` in XrayGPT, single-separator style). The image message
``<Img><ImageHere></Img>`` is joined to the first question with one space.
"""

from __future__ import annotations

from .. import DEFAULT_REPORT_QUESTION, EXAMPLE_QUESTIONS, Turn  # noqa: F401  (re-exported: XrayGPT's own prompts)

SYSTEM_TEXT = (
    "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. "
    "You will be able to see the medical scan once I provide it to you. Please answer my questions."
)
USER_ROLE = "Patient"
ASSISTANT_ROLE = "Doctor"
SEPARATOR = "###"
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"

def render_prompt(turns: list[Turn], question: str) -> str:
    """The full prompt for ``question`` after the finished ``turns`` (the image rides on the first)."""
    messages = []
    for i, turn in enumerate([*turns, Turn(question, "")]):
        text = f"{IMAGE_MESSAGE} {turn.question}" if i == 0 else turn.question
        messages.append(f"{USER_ROLE}: {text}{SEPARATOR}")
        if i < len(turns):
            messages.append(f"{ASSISTANT_ROLE}: {turn.answer}{SEPARATOR}")
    return SYSTEM_TEXT + SEPARATOR + "".join(messages) + f"{ASSISTANT_ROLE}:"


def split_on_image(prompt: str) -> tuple[str, str]:
    """The text before and after the one image placeholder."""
    before, found, after = prompt.partition(IMAGE_PLACEHOLDER)
    if not found or IMAGE_PLACEHOLDER in after:
        raise ValueError("a prompt must hold exactly one image placeholder")
    return before, after


def clean_answer(decoded: str, stop: str = SEPARATOR) -> str:
    """XrayGPT's clean-up: cut at the first stop string, keep what follows the last ``Doctor:``."""
    return decoded.split(stop)[0].split(f"{ASSISTANT_ROLE}:")[-1].strip()


def display_answer(stored: str) -> str:
    """What XrayGPT shows the user: the stored answer with its old model name replaced."""
    return stored.replace("ChatDoctor", "XrayGPT").replace("Chat Doctor", "XrayGPT")
