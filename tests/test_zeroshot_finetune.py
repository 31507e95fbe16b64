"""Fine-tuning the zero-shot models through ``xraygpt finetune --model NAME``.

The recorded losses and gradient norms of ``../shared/fixtures/medclip_tiny/expected_train.json``
(MedCLIP's ``ImageTextContrastiveLoss``) and of the training batch in
``../shared/fixtures/medklip_tiny/expected.json`` (``PreTrain_MedKLIP``, ``no_cl=True``) come from
the models' own code; tolerances are the fixtures' READMEs': loss relative 1e-5, gradient norms
relative 1e-4. Short runs are saved in each model's released format and served by ``classify``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _readme import REPO, venv_scripts

from xraygpt_app.cli import main
from xraygpt_app.train.zeroshot_data import CHEXPERT_TASKS
from xraygpt_app.train.zeroshot_eval import compare_aucs, rank_auc
from xraygpt_app.zeroshot.medclip import build_medclip, export_medclip_state_dict

MEDCLIP_CONFIG = REPO / "train_configs" / "medclip_tiny_finetune.yaml"
MEDKLIP_CONFIG = REPO / "train_configs" / "medklip_tiny_finetune.yaml"
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def medclip_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "medclip_tiny"


@pytest.fixture(scope="module")
def medclip_expected(medclip_dir: Path) -> dict:
    return json.loads((medclip_dir / "expected_train.json").read_text(encoding="utf-8"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _medclip_rows(expected: dict, samples_dir: Path, labels: bool) -> list[dict]:
    rows = []
    for i, (image, text) in enumerate(zip(expected["images"], expected["sentences"], strict=True)):
        row = {"image": str(samples_dir / image), "text": text}
        if labels:
            row.update(image_labels=expected["img_labels"][i], text_labels=expected["text_labels"][i])
        rows.append(row)
    return rows


def _loss_only(config: Path, model: str, data: Path, batch_size: int, capsys) -> dict:
    assert main(["finetune", "-c", str(config), "--model", model, "--data", str(data), "--loss-only", "--json",
                 "--batch-size", str(batch_size)]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_medclip_loss_and_gradients_match_medclips_own(kind, medclip_expected, samples_dir, tmp_path, capsys):
    data = _write(tmp_path / "pairs.jsonl", _medclip_rows(medclip_expected, samples_dir, labels=kind == "soft"))
    result = _loss_only(MEDCLIP_CONFIG, "medclip-vit", data, 4, capsys)
    expected = medclip_expected[kind]
    assert len(result["batches"]) == 1
    batch = result["batches"][0]
    assert batch["rows"] == 4
    assert batch["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)
    for name, norm in expected["grad_norms"].items():
        assert batch["grad_norms"][name] == pytest.approx(norm, rel=GRAD_RTOL), name


def test_medclip_labels_by_name_equal_labels_by_position(medclip_expected, samples_dir, tmp_path, capsys):
    rows = _medclip_rows(medclip_expected, samples_dir, labels=True)
    for row in rows:  # a mapping that leaves out the zeros (uncertain) means the same vector
        for key in ("image_labels", "text_labels"):
            row[key] = {task: v for task, v in zip(CHEXPERT_TASKS, row[key], strict=True) if v != 0}
    result = _loss_only(MEDCLIP_CONFIG, "medclip-vit", _write(tmp_path / "named.jsonl", rows), 4, capsys)
    assert result["batches"][0]["loss"] == pytest.approx(medclip_expected["soft"]["loss"], rel=LOSS_RTOL)


def test_medclip_bad_rows_name_the_line(medclip_expected, samples_dir, tmp_path, capsys):
    rows = _medclip_rows(medclip_expected, samples_dir, labels=True)
    rows[1]["image_labels"] = rows[1]["image_labels"][:13]
    data = _write(tmp_path / "bad.jsonl", rows)
    assert main(["finetune", "-c", str(MEDCLIP_CONFIG), "--data", str(data), "--loss-only"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "14 values" in err
    assert main(["finetune", "-c", str(MEDCLIP_CONFIG), "--model", "absent", "--data", str(data), "--loss-only"]) == 2
    assert "zeroshot.models" in capsys.readouterr().err


def test_medclip_export_is_the_released_file(medclip_dir):
    """Our model's tensors written back under MedCLIP's names equal the released file, key for key."""
    released = torch.load(medclip_dir / "medclip_vit_tiny" / "pytorch_model.bin", weights_only=True)
    model = build_medclip(medclip_dir / "medclip_vit_tiny", str(medclip_dir / "bert_tiny"),
                          str(medclip_dir / "swin_tiny"))
    exported = export_medclip_state_dict(model)
    assert set(exported) == set(released)
    for key, value in released.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key


def _docs_block(section: str) -> str:
    text = (REPO / "docs" / "fine-tuning-zeroshot.md").read_text(encoding="utf-8")
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", body, re.S).group(1)


def test_docs_medclip_commands_run_as_written_and_classify_serves_the_result(tmp_path, shared_dir, samples_dir,
                                                                            capsys):
    """docs/fine-tuning-zeroshot.md's tiny run in a scratch layout: it learns, saves MedCLIP's layout, and
    classify serves the saved folder."""
    (tmp_path / "shared").symlink_to(shared_dir)
    repo = tmp_path / "repo"
    venv_scripts(repo)
    (repo / "train_configs").symlink_to(REPO / "train_configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", _docs_block("## Try it on the tiny models")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AUC on the validation split, starting model vs fine-tuned" in done.stdout
    out = repo / "output" / "medclip_tiny_run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])  # the demo schedule learns (dropout makes single steps noisy)
    assert (out / "loss_curve.png").is_file()
    assert (out / "auc_curve.png").is_file()
    comparison = json.loads((out / "auc_comparison.json").read_text())
    assert comparison["labels"] == ["No Finding", "Cardiomegaly", "Pleural Effusion"]  # both classes known
    for row in comparison["per_label"].values():
        assert row["difference"] == pytest.approx(row["auc_after"] - row["auc_before"])
    folder = out / "medclip-vit_11"
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    checkpoint = torch.load(out / "checkpoint_11.pth", weights_only=True)
    for key, value in checkpoint["model"].items():  # the released folder holds the run's last weights
        assert torch.equal(saved[key], value), key
    image = str(samples_dir / "nih_cxr14_00000001_000_pa_512.png")
    args = ["classify", image, "-c", str(MEDCLIP_CONFIG), "--json", "--labels", "edema,pneumonia"]
    assert main([*args, "--set", f"zeroshot.models.medclip-vit.weights={folder}"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert tuned != json.loads(capsys.readouterr().out)  # the served weights are the trained ones


@pytest.fixture(scope="module")
def medklip_expected(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "fixtures" / "medklip_tiny" / "expected.json").read_text(encoding="utf-8"))


def _medklip_rows(expected: dict, samples_dir: Path) -> list[dict]:
    train = expected["train"]
    return [{"image": str(samples_dir / image), "labels": dict(zip(expected["entities"], labels, strict=True))}
            for image, labels in zip(train["images"], train["labels"], strict=True)]


def test_medklip_loss_and_gradients_match_medklips_own(medklip_expected, samples_dir, tmp_path, capsys):
    data = _write(tmp_path / "labels.jsonl", _medklip_rows(medklip_expected, samples_dir))
    result = _loss_only(MEDKLIP_CONFIG, "medklip", data, 3, capsys)
    expected = medklip_expected["train"]
    batch = result["batches"][0]
    labels = torch.tensor(expected["labels"])
    assert batch["labelled_pairs"] == int(((labels == 0) | (labels == 1)).sum())  # the pairs that carry loss
    assert batch["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL)
    for name, norm in expected["grad_norms"].items():
        # one FFN ReLU input sits 4e-9 from zero in this batch: met only because our decoder rounds as
        # MedKLIP's does (see zeroshot.medklip._decoder_layer); the other side of zero is 1e-4 off
        assert batch["grad_norms"][name] == pytest.approx(norm, rel=GRAD_RTOL), name


def test_medklip_finetune_saves_the_released_format_and_classify_serves_it(medklip_expected, shared_dir, samples_dir,
                                                                           tmp_path, capsys):
    data = _write(tmp_path / "labels.jsonl", _medklip_rows(medklip_expected, samples_dir))
    out = tmp_path / "run"
    assert main(["finetune", "-c", str(MEDKLIP_CONFIG), "--data", str(data), "--val", str(data),
                 "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])
    released = torch.load(summary["export"], weights_only=True)
    assert set(released) == {"model", "config", "epoch"}
    assert all(key.startswith("module.") for key in released["model"])
    original = torch.load(shared_dir / "fixtures" / "medklip_tiny" / "checkpoint_final.pth", weights_only=True)
    assert set(released["model"]) == set(original["model"])
    assert released["config"] == original["config"]
    assert summary["auc_comparison"]["labels"]
    image = str(samples_dir / medklip_expected["train"]["images"][0])
    args = ["classify", image, "-c", str(MEDKLIP_CONFIG), "--json", "--labels", "pneumonia,effusion"]
    assert main([*args, "--set", f"zeroshot.models.medklip.weights={summary['export']}"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert tuned != json.loads(capsys.readouterr().out)



def test_rank_auc_equals_scikit_learns_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for n in (4, 9, 40):
        truth = (np.arange(n) % 3 == 0).astype(float)
        score = np.round(rng.normal(size=n), 1)  # rounded: ties
        assert rank_auc(truth, score) == pytest.approx(roc_auc_score(truth, score), abs=1e-12)


def test_compare_aucs_leaves_unknown_labels_out_and_pairs_the_difference() -> None:
    truth = np.array([[1, np.nan], [0, 1], [1, 0], [0, np.nan], [1, 0], [0, 1]])
    before = np.array([[0.9, 5.0], [0.1, 0.2], [0.8, 0.9], [0.2, -5.0], [0.3, 0.1], [0.4, 0.3]])
    after = before.copy()
    after[4, 0] = 0.95  # one positive now ranks above every negative
    result = compare_aucs(["a", "b"], truth, before, after, n_resamples=200)
    a, b = result["per_label"]["a"], result["per_label"]["b"]
    assert a["auc_before"] == pytest.approx(roc_auc_score_of(truth[:, 0], before[:, 0]))
    assert a["auc_after"] == 1.0
    assert a["difference"] == pytest.approx(1.0 - a["auc_before"])
    assert (a["positives"], a["negatives"]) == (3, 3)
    assert (b["positives"], b["negatives"]) == (2, 2)  # the NaN rows are left out of b
    assert b["difference"] == 0.0
    assert b["difference_ci95"] == [0.0, 0.0]  # paired: the same images for both models


def roc_auc_score_of(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, score))


def test_biomedclip_loss_is_open_clips_own_and_the_saved_folder_loads(three_kinds_config, samples_dir, tmp_path,
                                                                       capsys):
    """BiomedCLIP's --loss-only equals open_clip's ClipLoss on the model open_clip loads; a run's folder loads back."""
    from open_clip.loss import ClipLoss
    from PIL import Image

    from xraygpt_app.config import load_config
    from xraygpt_app.zeroshot.biomedclip import load_biomedclip, load_open_clip

    texts = ["The heart is normal in size.", "There is a moderate right pleural effusion.",
             "Bilateral patchy opacities."]
    names = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png", "covidcxr_2168a917_pa_2000.jpg"]
    data = _write(tmp_path / "pairs.jsonl", [{"image": str(samples_dir / n), "text": t}
                                             for n, t in zip(names, texts, strict=True)])
    result = _loss_only(three_kinds_config, "biomedclip", data, 3, capsys)
    spec = load_config(three_kinds_config).zeroshot.models["biomedclip"]
    model, preprocess, tokenizer = load_biomedclip(spec.weights.sources[0], spec.text_config)
    pixels = torch.stack([preprocess(Image.open(samples_dir / n).convert("RGB")) for n in names])
    image_features, text_features, scale = model(pixels, tokenizer(texts))[:3]  # normalised, exp(logit_scale)
    loss = ClipLoss()(image_features, text_features, scale)
    loss.backward()
    batch = result["batches"][0]
    assert batch["loss"] == pytest.approx(loss.item(), rel=LOSS_RTOL)
    reference = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    assert set(batch["grad_norms"]) == set(reference)  # every parameter trains, under open_clip's names
    for name, norm in reference.items():
        assert batch["grad_norms"][name] == pytest.approx(norm, rel=GRAD_RTOL, abs=1e-9), name

    out_dir = tmp_path / "run"
    assert main(["finetune", "-c", str(three_kinds_config), "--model", "biomedclip", "--data", str(data),
                 "--output", str(out_dir), "--set", "train.max_epoch=1", "--set", "train.batch_size=3",
                 "--set", "train.val_fraction=0", "--set", "train.warmup_steps=0", "--json"]) == 0
    folder = Path(json.loads(capsys.readouterr().out)["export"])
    assert (folder / "open_clip_config.json").is_file()
    loaded, _ = load_open_clip(folder, spec.text_config)  # open_clip's own strict load, as classify serves it
    saved = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_loss_chart_legend_covers_no_line() -> None:
    """The legend sits outside the axes, so it cannot hide the validation line (it did in the upper right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from xraygpt_app.charts import loss_figure

    fig = loss_figure([(1, 2.0), (2, 1.5), (3, 1.2)], [(1, 2.1), (3, 1.9)])
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.y1 < axes.y0  # entirely below the plotting area


def test_medclip_resumed_run_equals_an_uninterrupted_one(medclip_expected, samples_dir, tmp_path) -> None:
    """Stopped after two steps (as Ctrl-C stops) and resumed from its checkpoint, the run ends where one run ends:
    the same saved weights and the same logged losses (dropout is seeded per iteration)."""
    from xraygpt_app.train.trainer import Trainer

    data = _write(tmp_path / "pairs.jsonl", _medclip_rows(medclip_expected, samples_dir, labels=False))
    overrides = ["train.max_epoch=4", "train.batch_size=2"]
    whole = Trainer.from_config(MEDCLIP_CONFIG, data=data, overrides=overrides, output=tmp_path / "whole").fit()
    cut = Trainer.from_config(MEDCLIP_CONFIG, data=data, overrides=overrides, output=tmp_path / "cut").fit(stop_after=2)
    assert cut.interrupted
    resumed = Trainer.from_config(MEDCLIP_CONFIG, data=data, overrides=overrides, output=tmp_path / "cut").fit(
        resume=cut.checkpoint)
    assert resumed.iterations_done == whole.iterations_done == 8
    first = torch.load(whole.export / "pytorch_model.bin", weights_only=True)
    second = torch.load(resumed.export / "pytorch_model.bin", weights_only=True)
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "train"] for run in ("whole", "cut")]
    assert losses[0] == losses[1]


@pytest.mark.usefixtures("medclip_fixture_dir")  # the tiny BERT of ../shared/fixtures/medclip_tiny
def test_medclip_resnet_export_is_the_released_file(tmp_path) -> None:
    """The ResNet variant written back (BatchNorm statistics included) equals the released-style file."""
    import tinyzeroshot

    from xraygpt_app.zeroshot.medclip import read_medclip_file

    archive, _ = tinyzeroshot.medclip_resnet_zip(tmp_path)
    released = read_medclip_file(archive)
    exported = export_medclip_state_dict(build_medclip(archive, str(tinyzeroshot.BERT_TINY), variant="resnet"))
    assert set(exported) == set(released)
    for key, value in released.items():
        assert torch.equal(exported[key], value), key


def test_a_run_that_ends_inside_warm_up_is_warned_about(medclip_expected, samples_dir, tmp_path, caplog) -> None:
    from xraygpt_app.train.trainer import Trainer

    data = _write(tmp_path / "pairs.jsonl", _medclip_rows(medclip_expected, samples_dir, labels=False))
    overrides = ["train.max_epoch=1", "train.warmup_steps=5"]  # one batch of 4: iteration 0 of 5 warm-up steps
    with caplog.at_level("WARNING", logger="xraygpt_app.train.trainer"):
        Trainer.from_config(MEDCLIP_CONFIG, data=data, overrides=overrides, output=tmp_path / "run").fit()
    assert "ends inside warm-up (1 iterations, train.warmup_steps 5)" in caplog.text
