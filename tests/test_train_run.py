"""Fine-tuning runs on the tiny fixture model: overfit, resume, serve the result, LoRA, CLI, failures."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import traindata
from helpers import REPO, metric_records

from xraygpt_app.api import Assistant
from xraygpt_app.cli import main
from xraygpt_app.config import load_config
from xraygpt_app.errors import ConfigError
from xraygpt_app.families.xraygpt.model import resolve_model_weights
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.llm import load_llm
from xraygpt_app.placement import plan_placement
from xraygpt_app.train import outputs
from xraygpt_app.train.config import TrainConfig, load_train_config
from xraygpt_app.train.schedule import learning_rate
from xraygpt_app.train.trainer import Trainer
from xraygpt_app.train.xraygpt_objective import read_instructions
from xraygpt_app.web.handlers import model_line
from xraygpt_app.web.services import Services

QUIET = ["train.report_samples=0", "train.val_fraction=0", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    return traindata.caption_folder(tmp_path_factory.mktemp("data"), samples_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path, tiny_config) -> Path:
    """Two rows, 20 iterations of LoRA + Q-Former + llama_proj at a high learning rate."""
    folder = traindata.caption_folder(tmp_path_factory.mktemp("few"), samples_dir, list(traindata.CAPTIONS)[:2])
    out = tmp_path_factory.mktemp("lora_run")
    overrides = [*QUIET, "train.max_epoch=10", "train.init_lr=1e-2", "train.min_lr=1e-3", "train.augment=false",
                 "train.lora.enabled=true", "train.train_qformer=true", "train.batch_size=2"]
    result = Trainer.from_config(tiny_config, data=folder, overrides=overrides, output=out).fit()
    assert not result.interrupted
    assert result.checkpoint == out / "checkpoint_9.pth"
    return out


def test_a_few_samples_overfit(lora_run: Path) -> None:
    losses = [r["loss"] for r in metric_records(lora_run)]
    assert len(losses) == 10
    assert losses[-1] < 0.6 * losses[0]
    first = metric_records(lora_run)[0]
    assert {"lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(first)
    assert first["tokens_per_s"] > 0
    assert (lora_run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (lora_run / "lora_adapter_9" / "adapter_config.json").is_file()


def test_checkpoint_has_xraygpts_layout_and_serves(lora_run: Path, samples_dir: Path, tiny_config) -> None:
    checkpoint = torch.load(lora_run / "checkpoint_9.pth", weights_only=True)
    assert {"model", "optimizer", "config", "scaler", "epoch"} <= set(checkpoint)
    assert "query_tokens" in checkpoint["model"]
    assert "llama_proj.weight" in checkpoint["model"]
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in checkpoint["model"]
    model = Assistant.from_config(tiny_config, overrides=[f"weights.ckpt={lora_run / 'checkpoint_9.pth'}",
                                                   f"weights.lora={lora_run / 'lora_adapter_9'}"])
    bridge = model.model.bridge
    torch.testing.assert_close(bridge.llama_proj.weight, checkpoint["model"]["llama_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bridge.query_tokens, checkpoint["model"]["query_tokens"], rtol=0, atol=0)
    line = model_line(Services(model.config, assistant=model)).replace("\\_", "_")  # the app's "model" line
    assert f"checkpoint {lora_run.name}/checkpoint_9.pth" in line
    assert "LoRA lora_adapter_9" in line
    image = load_radiograph(samples_dir / "nih_cxr14_00000001_000_pa_512.png").image
    turn = model.report(image, do_sample=False, max_new_tokens=8)
    assert turn.answer
    assert len(turn.token_ids) > 0


def test_lora_merged_equals_unmerged(lora_run: Path, tiny_config) -> None:
    from peft import PeftModel

    config = load_config(tiny_config)
    placement = plan_placement(config.runtime, config.vision)
    folder = resolve_model_weights(config).llama_model
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    base = load_llm(folder, config.llm, placement)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    unmerged = PeftModel.from_pretrained(base, str(lora_run / "lora_adapter_9"))
    with torch.no_grad():
        adapted = unmerged(input_ids=ids).logits
        merged = unmerged.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapter learned something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_resume_gives_the_uninterrupted_run(tmp_path: Path, data: Path, tiny_config) -> None:
    overrides = ["train.report_samples=0", "train.val_fraction=0.25", "train.max_epoch=2", "train.warmup_steps=2",
                 "train.init_lr=1e-2", "train.train_qformer=true", "train.grad_accum_steps=2"]
    whole = Trainer.from_config(tiny_config, data=data, overrides=overrides, output=tmp_path / "whole").fit()
    first = Trainer.from_config(tiny_config, data=data, overrides=overrides, output=tmp_path / "cut").fit(stop_after=4)
    assert first.interrupted
    assert first.checkpoint == tmp_path / "cut" / "checkpoint_last.pth"
    second = Trainer.from_config(tiny_config, data=data, overrides=overrides, output=tmp_path / "cut").fit(
        resume=first.checkpoint)
    assert whole.iterations_done == second.iterations_done == 6
    for kind in ("train", "val"):
        want, got = metric_records(tmp_path / "whole", kind), metric_records(tmp_path / "cut", kind)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for a, b in zip(got, want, strict=True):
            assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), rel=1e-6)
    final_whole = torch.load(tmp_path / "whole" / "checkpoint_1.pth", weights_only=True)["model"]
    final_cut = torch.load(tmp_path / "cut" / "checkpoint_1.pth", weights_only=True)["model"]
    for key, value in final_whole.items():
        torch.testing.assert_close(final_cut[key], value, rtol=0, atol=1e-7)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, data: Path, tiny_config) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "xraygpt_app.cli", "finetune", "-c", str(tiny_config), "--data", str(data),
               "--output", str(out), *[f"--set={o}" for o in [*QUIET, "train.max_epoch=500", "train.num_workers=1"]]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not metric_records(out):  # training has started
        assert process.poll() is None, process.stderr.read() if process.poll() else ""
        assert time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted; resume with --resume" in stdout
    assert "Traceback" not in stderr
    checkpoint = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["iteration"] == checkpoint["step"] == metric_records(out)[-1]["step"] > 0
    assert set(checkpoint["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert (out / "loss_curve.png").is_file()


def test_loss_only_cli_reproduces_the_fixture(tmp_path: Path, samples_dir: Path, xraygpt_fixture_dir: Path,
                                              capsys: pytest.CaptureFixture, tiny_config) -> None:
    expected = json.loads((xraygpt_fixture_dir / "expected_train.json").read_text(encoding="utf-8"))
    lines = [line.split("</Img> ", 1)[1] for line in read_instructions()]
    for size, batches in ((1, expected["batches"][:2]), (2, expected["batches"][2:])):
        rows = [{"image": str(samples_dir / image), "answer": caption, "question": lines[batch["prompt_index"]]}
                for batch in batches for image, caption in zip(batch["images"], batch["captions"], strict=True)]
        data = traindata.write_jsonl(tmp_path / f"fixture_{size}.jsonl", rows)
        assert main(["finetune", "-c", str(tiny_config), "--loss-only", "--data", str(data), "--batch-size", str(size),
                     "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["batches"]
        for mine, theirs in zip(got, batches, strict=True):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            for name, norm in theirs["grad_l2"].items():
                assert mine["grad_norms"][name] == pytest.approx(norm, rel=1e-4)


def test_two_processes_match_one(tmp_path: Path, samples_dir: Path, tiny_config) -> None:
    """torchrun + gloo (accelerate's CPU launcher needs MPI): 2 x 1 row per step = 1 x 2 rows per step.

    All rows share one caption, so both processes' mean token losses average to the global one.
    """
    names = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png",
             "hannover_00870a9c_ap_bedside_640x524.png", "nih_cxr14_00000013_004_ap_1024.png"]
    data = traindata.write_jsonl(tmp_path / "same.jsonl", [{"image": str(samples_dir / n),
                                                           "caption": "The lungs are clear."} for n in names])
    common = ["-m", "xraygpt_app.cli", "finetune", "-c", str(tiny_config), "--data", str(data), "--json",
              *[f"--set={o}" for o in [*QUIET, "train.augment=false", "train.init_lr=1e-2"]]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    subprocess.run([*launch, *common, "--output", str(tmp_path / "two"), "--set", "train.batch_size=1"],
                   check=True, env=env, capture_output=True, timeout=300)
    assert main([*common[2:], "--output", str(tmp_path / "one"), "--set", "train.batch_size=2"]) == 0
    two, one = metric_records(tmp_path / "two"), metric_records(tmp_path / "one")
    assert len(two) == len(one) == 2
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    weights = [torch.load(tmp_path / run / "checkpoint_0.pth", weights_only=True)["model"] for run in ("two", "one")]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-6)


def test_bad_rows_stop_the_cli_or_are_skipped(tmp_path: Path, samples_dir: Path, tiny_config: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    folder = traindata.caption_folder(tmp_path / "d", samples_dir, list(traindata.CAPTIONS)[:2],
                                      [{"image_id": "gone", "caption": "x"}])
    args = ["finetune", "-c", str(tiny_config), "--data", str(folder), "--output", str(tmp_path / "out"), "--json",
            *[f"--set={o}" for o in QUIET]]
    assert main(args) == 2
    assert "filter_cap.json: annotation 2: no image named gone" in capsys.readouterr().err
    val = traindata.write_jsonl(tmp_path / "val.jsonl", [{"image": str(samples_dir / traindata.PNG), "caption": "x"}])
    assert main([*args, "--skip-bad", "--val", str(val)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train_rows"], summary["val_rows"], summary["skipped_rows"]) == (2, 1, 1)
    assert summary["val_loss"] > 0


def test_qlora_is_refused_on_the_cpu(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, tiny_config) -> None:
    code = main(["finetune", "-c", str(tiny_config), "--data", str(data), "--set", "train.lora.enabled=true",
                 "--set", "train.quantization=4bit"])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_unknown_train_key_is_an_error(tmp_path: Path, tiny_config) -> None:
    with pytest.raises(ConfigError, match="unknown key train.batchsize"):
        load_train_config(tiny_config, ["train.batchsize=2"])
    config, train = load_train_config(REPO / "train_configs" / "xraygpt_openi_finetune.yaml")
    assert (train.init_lr, train.min_lr, train.warmup_lr, train.warmup_steps, train.iters_per_epoch) == (
        3e-5, 1e-5, 1e-6, 200, 2501)
    assert load_config(REPO / "train_configs" / "xraygpt_openi_finetune.yaml").weights.ckpt.sources  # serve reads it


def test_learning_rate_is_lavis_linear_warmup_cosine() -> None:
    train = TrainConfig(max_epoch=1)
    assert learning_rate(0, 2501, train) == pytest.approx(1e-6)
    assert learning_rate(100, 2501, train) == pytest.approx(1e-6 + (3e-5 - 1e-6) * 0.5)
    cosine = (3e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 200 / 2501)) + 1e-5
    assert learning_rate(200, 2501, train) == pytest.approx(cosine)
    assert learning_rate(2500, 2501, train) == pytest.approx(1e-5, rel=1e-3)


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "checkpoint_0.pth"
    outputs.save_atomically({"model": {"w": torch.ones(2)}}, good, None)
    real_save = torch.save

    def full_disk(obj, path):  # write part of the file, then fail as a full disk does
        real_save({"partial": torch.zeros(1)}, path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.torch, "save", full_disk)
    with pytest.raises(outputs.TrainingError, match="the disk is full; the last good checkpoint is .*checkpoint_0"):
        outputs.save_atomically({"model": {"w": torch.zeros(2)}}, good, good)
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0.pth"]
