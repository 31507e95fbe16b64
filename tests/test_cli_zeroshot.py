"""``xraygpt classify`` and ``xraygpt evaluate`` end to end on the tiny fixtures and real sample files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from xraygpt_app.cli import main
from xraygpt_app.config import load_config
from xraygpt_app.evaluation.metrics import report_metrics
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.zeroshot.classifier import PRESETS, ZeroShotClassifier

PNG = b"\x89PNG\r\n\x1a\n"
LABELLED = [  # a made-up ground truth over real files (the tiny model's scores are random anyway)
    ("nih_cxr14_00000001_000_pa_512.png", "Cardiomegaly"),
    ("nih_cxr14_00000013_004_ap_1024.png", "Pleural Effusion"),
    ("hannover_00870a9c_ap_bedside_640x524.png", "Consolidation"),
    ("covidcxr_53c9be49_ap_supine_2000.jpg", "Consolidation"),
    ("dx_nih_chest_mono2_8bit_implicit_vr.dcm", "Cardiomegaly"),
    ("hannover_1479fa94_pa_640x755.png", "Pleural Effusion"),
    ("covidcxr_ARDSSevere_rgb_790x631.png", "Edema"),
]


@pytest.fixture
def tiny(tiny_config: Path) -> str:
    return str(tiny_config)


def test_classify_table_json_and_chart(tmp_path, capsys, samples_dir, tiny):
    image = str(samples_dir / "nih_cxr14_00000001_000_pa_512.png")
    dicom = str(samples_dir / "cr_nema_rg1_chest_pa_mono1_15bit_j2k_lossy.dcm")
    chart = tmp_path / "scores.png"
    assert main(["classify", image, dicom, "-c", tiny, "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert out.count("predicted") == 2
    assert "not a diagnosis" in out
    assert chart.read_bytes().startswith(PNG)
    assert main(["classify", image, "-c", tiny, "--labels", "edema, no finding", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (result,) = payload["results"]
    assert result["labels"] == ["edema", "no finding"]
    assert result["model"] == "medclip-vit"
    assert result["predicted"] == result["labels"][int(np.argmax(result["logits"]))]
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert main(["classify", image, "-c", tiny, "--labels", "edema, no finding", "--json",
                 "--template", "{} on a frontal radiograph", "--template", "findings: {}"]) == 0
    templated = json.loads(capsys.readouterr().out)["results"][0]
    assert templated["labels"] == result["labels"]
    assert templated["logits"] != result["logits"]
    assert main(["classify", image, "-c", tiny, "--labels", "edema", "--template", "no placeholder"]) == 2


def test_classify_prompt_file_and_ensemble(tmp_path, capsys, samples_dir, tiny):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("Edema: [pulmonary edema, interstitial edema]\nNormal: [the lungs are clear]\n")
    image = str(samples_dir / "hannover_1479fa94_pa_640x755.png")
    assert main(["classify", image, "-c", tiny, "--prompts", str(prompts), "--json", "--ensemble", "max"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["labels"] == ["Edema", "Normal"]


def test_classify_errors_have_exit_codes(tmp_path, capsys, samples_dir, tiny):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    assert main(["classify", str(not_image), "-c", tiny]) == 2
    image = str(samples_dir / "nih_cxr14_00000001_000_pa_512.png")
    assert main(["classify", image, str(tmp_path / "absent.png"), "-c", tiny]) == 2
    assert "absent.png: No such file" in capsys.readouterr().err  # which of several images failed
    assert main(["classify", image, "-c", tiny, "--chart", str(tmp_path / "no" / "dir" / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the chart" in err
    assert "Traceback" not in err
    missing = f"zeroshot.models.medclip-vit.weights={tmp_path / 'w.bin'}"
    assert main(["classify", image, "-c", tiny, "--set", missing]) == 3
    err = capsys.readouterr().err
    assert "w.bin" in err
    assert "Traceback" not in err


def _write_csv(tmp_path: Path, samples_dir) -> Path:
    """image,label rows with image paths relative to the CSV's folder."""
    rows = [f"{os.path.relpath(samples_dir / name, tmp_path)},{label}" for name, label in LABELLED]
    path = tmp_path / "labels.csv"
    path.write_text("image,label\n" + "\n".join(rows) + "\n")
    return path


def test_evaluate_zeroshot_agrees_with_sklearn(tmp_path, capsys, samples_dir, tiny):
    csv_path = _write_csv(tmp_path, samples_dir)
    out = tmp_path / "out"
    assert main(["evaluate", "--task", "zeroshot", "--data", str(csv_path), "-c", tiny, "--out", str(out),
                 "--bootstrap", "200"]) == 0
    assert "macro AUC" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "roc.png").read_bytes().startswith(PNG)
    assert (out / "auc_per_class.png").read_bytes().startswith(PNG)
    labels = sorted({label for _, label in LABELLED})
    assert metrics["labels"] == labels
    assert metrics["n_images"] == len(LABELLED)
    # Independent computation: the Python API's logits and scikit-learn directly.
    config = load_config(tiny)
    classifier = ZeroShotClassifier.from_config(config, "medclip-vit")
    prompts = PRESETS["chexpert5"].build(config.zeroshot.prompts_per_class, config.zeroshot.seed)
    images = [load_radiograph(samples_dir / name).image for name, _ in LABELLED]
    logits = classifier.logits(images, {label: prompts[label] for label in labels}).numpy().astype(np.float64)
    truth = np.array([labels.index(label) for _, label in LABELLED])
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, logits.argmax(1)), abs=1e-9)
    assert metrics["confusion_matrix"]["matrix"] == confusion_matrix(truth, logits.argmax(1)).tolist()
    sigmoid = 1 / (1 + np.exp(-logits))
    aucs = [roc_auc_score(truth == c, sigmoid[:, c]) for c in range(len(labels))]
    for label, auc in zip(labels, aucs, strict=True):
        assert metrics["per_class"][label]["auc"] == pytest.approx(auc, abs=1e-6)
        low, high = metrics["per_class"][label]["auc_ci95"] or (0.0, 1.0)
        assert 0.0 <= low <= high <= 1.0
    assert metrics["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-6)


def test_evaluate_zeroshot_multilabel_with_an_absent_finding(tmp_path, samples_dir, tiny):
    rows = ["image,Cardiomegaly,Edema,Pleural Effusion"]
    for i, (name, _) in enumerate(LABELLED[:5]):
        rows.append(f"{samples_dir / name},{i % 2},0,{int(i < 2)}")
    csv_path = tmp_path / "multi.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["evaluate", "--task", "zeroshot", "--data", str(csv_path), "-c", tiny, "--out", str(out),
                 "--bootstrap", "50"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_type"] == "multi-label"
    assert metrics["per_class"]["Edema"]["auc"] is None
    assert "undefined" in metrics["per_class"]["Edema"]["note"]
    assert metrics["per_class"]["Cardiomegaly"]["auc"] is not None


def test_evaluate_rejects_labels_the_prompts_lack(tmp_path, capsys, samples_dir, tiny):
    csv_path = _write_csv(tmp_path, samples_dir)
    code = main(["evaluate", "--task", "zeroshot", "--data", str(csv_path), "-c", tiny,
                 "--out", str(tmp_path / "o"), "--preset", "covid"])
    assert code == 2
    assert "Cardiomegaly" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that fails


def test_evaluate_report_end_to_end(tmp_path, capsys, samples_dir, tiny):
    """Report generation with the tiny Assistant (greedy); BLEU/ROUGE-L must equal those of the API's answers.

    The first reference is the model's own answer, so its scores are 1 and the check is not 0 == 0.
    """
    from xraygpt_app.api import Assistant

    names = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png"]
    overrides = ["generation.do_sample=false", "generation.max_new_tokens=8"]
    model = Assistant.from_config(load_config(tiny, overrides))
    answers = [model.report(load_radiograph(samples_dir / n).image).answer for n in names]
    assert answers[0].strip()
    references = [answers[0], "Lungs are clear."]
    csv_path = tmp_path / "reports.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report"])
        writer.writerows([str(samples_dir / n), r] for n, r in zip(names, references, strict=True))
    args = ["evaluate", "--task", "report", "--data", str(csv_path), "-c", tiny, "--out", str(tmp_path / "out")]
    assert main(args + [x for o in overrides for x in ("--set", o)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = report_metrics(answers, references)
    assert metrics["overall"] == pytest.approx(expected["overall"])
    assert metrics["per_item"][0]["rougeL"] == pytest.approx(1.0)
    assert [m["image"] for m in metrics["per_item"]] == [str(samples_dir / n) for n in names]
