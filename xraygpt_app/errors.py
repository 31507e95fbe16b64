"""User-facing error types. Each carries the CLI exit code it maps to."""


class XrayGPTError(Exception):
    """Base for errors whose message is meant for the user, not a traceback."""

    exit_code = 1


class BadInputError(XrayGPTError):
    """The user gave something we cannot use (file, question, option)."""

    exit_code = 2


class ConfigError(BadInputError):
    """A config file or override is invalid; the message names the file and key."""


class ImageLoadError(BadInputError):
    """An upload or file is not a usable radiograph; the message says why in plain words."""


class MissingWeightsError(XrayGPTError):
    """A weights file is absent; the message says which, where we looked and how to get it."""

    exit_code = 3

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name  # the config entry, e.g. "weights.ckpt" (empty when not one entry)


class ModelMemoryError(XrayGPTError):
    """The device ran out of memory during an answer; the conversation is left as it was."""


class LLMServerError(XrayGPTError):
    """The vLLM server behind ``runtime.llm_backend: vllm`` failed, refused or cannot be reached."""

    exit_code = 4
