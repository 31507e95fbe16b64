"""Third-party notices about nothing the user can act on are filtered, narrowly (by message and source)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import tinymodels
from helpers import REPO

from xraygpt_app.config import RuntimeConfig, VisionConfig
from xraygpt_app.llm import apply_lora_adapter
from xraygpt_app.placement import plan_placement

DEPRECATED = "is_gradient_checkpointing"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A peft LoRA adapter folder for the tiny LLaMA, as `xraygpt finetune` saves one."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("lora") / "adapter"
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(tinymodels.llama(), config).save_pretrained(folder)
    return folder


def test_peft_on_transformers_still_warns_about_the_deprecated_property(adapter):
    from peft import PeftModel

    with pytest.warns(FutureWarning, match=DEPRECATED):  # the cause is upstream: the filter below is needed
        PeftModel.from_pretrained(tinymodels.llama(), str(adapter))


def test_a_lora_adapter_loads_without_the_deprecation_warning(adapter):
    placement = plan_placement(RuntimeConfig(mode="fp32"), VisionConfig(), cuda_available=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora_adapter(tinymodels.llama(), adapter, placement)
    assert [str(w.message) for w in caught if DEPRECATED in str(w.message)] == []


def test_bitsandbytes_missing_kernels_notice_is_filtered_and_nothing_else():
    # On CPUs with AVX-512 BF16 (this machine's) `import bitsandbytes` logs it every time without the filter.
    pytest.importorskip("bitsandbytes")
    code = ("from xraygpt_app.cli import quiet_known_notices; quiet_known_notices(); import bitsandbytes, logging; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('%s', 'another notice')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "No module named 'kernels'" not in done.stderr
    assert "another notice" in done.stderr  # the same logger's other messages still reach the user
