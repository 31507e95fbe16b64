"""CheXbert labels and F1 against ``shared/fixtures/chexbert_tiny`` (f1chexbert 0.0.2's own output on a tiny
model in the released format), through the command line as a user runs it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from helpers import TINY_CONFIG as TINY
from sklearn.metrics import classification_report

from xraygpt_app.cli import main
from xraygpt_app.errors import BadInputError
from xraygpt_app.evaluation.chexbert import (
    CONDITIONS,
    CheXbertLabeler,
    clean_report,
    encode_report,
    remap_chexbert,
)
from xraygpt_app.evaluation.clinical import f1_scores
from xraygpt_app.evaluation.report_scores import comparison_rows, format_comparison, parse_metrics

PNG = b"\x89PNG\r\n\x1a\n"
SUMMARY = ("micro_f1_14", "macro_f1_14", "micro_f1_5", "macro_f1_5", "accuracy_5")


@pytest.fixture(scope="module")
def fixture_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "chexbert_tiny"


@pytest.fixture(scope="module")
def expected(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def labeler(fixture_dir: Path) -> CheXbertLabeler:
    return CheXbertLabeler.from_files(fixture_dir / "chexbert.pth", fixture_dir / "bert_base_uncased_tiny")


def write_config(folder: Path, weights: Path, bert: Path) -> Path:
    """A YAML config with only the two CheXbert keys (what a user adds to their own config)."""
    path = folder / "chexbert.yaml"
    path.write_text(f"evaluation:\n  chexbert:\n    weights: {weights}\n    bert: {bert}\n    batch_size: 5\n",
                    encoding="utf-8")
    return path


def write_pairs(path: Path, references: list[str], generated: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["report", "generated"])
        writer.writerows(zip(references, generated, strict=True))
    return path


def assert_close(actual, wanted, where: str = "") -> None:
    """Nested dicts of numbers equal to 1e-6 with the same keys."""
    if isinstance(wanted, dict):
        assert set(actual) == set(wanted), where
        for key in wanted:
            assert_close(actual[key], wanted[key], f"{where}.{key}")
    else:
        assert actual == pytest.approx(wanted, abs=1e-6), where


def test_cli_reproduces_the_reference_fixture(fixture_dir, expected, tmp_path, capsys):
    """report,generated pairs + --metrics chexbert + a config naming the two files: labels exact, metrics to 1e-6."""
    config = write_config(tmp_path, fixture_dir / "chexbert.pth", fixture_dir / "bert_base_uncased_tiny")
    pairs = write_pairs(tmp_path / "pairs.csv", expected["refs"], expected["hyps"])
    out = tmp_path / "out"
    args = ["evaluate", "--task", "report", "--data", str(pairs), "--metrics", "chexbert", "-c", str(config),
            "--out", str(out), "--bootstrap", "200"]
    assert main(args) == 0
    assert "CheXbert micro-F1(14) 0.819" in capsys.readouterr().out
    section = json.loads((out / "metrics.json").read_text())["chexbert"]
    labels = expected["labels"]
    assert section["labels"]["references"] == labels["refs_rrg"]
    assert section["labels"]["generated"] == labels["hyps_rrg"]
    assert section["labels"]["references_classification"] == labels["refs_classification"]
    assert section["observations"] == expected["target_names"]
    assert_close(section["classification_report_14"], expected["classification_report_14"])
    assert_close(section["classification_report_5"], expected["classification_report_5"])
    assert section["accuracy_5"] == pytest.approx(expected["accuracy_5"], abs=1e-6)
    assert section["per_report_accuracy_5"] == expected["pe_accuracy_5"]
    report_14, report_5 = expected["classification_report_14"], expected["classification_report_5"]
    assert section["micro_f1_14"] == pytest.approx(report_14["micro avg"]["f1-score"], abs=1e-6)
    assert section["macro_f1_14"] == pytest.approx(report_14["macro avg"]["f1-score"], abs=1e-6)
    assert section["micro_f1_5"] == pytest.approx(report_5["micro avg"]["f1-score"], abs=1e-6)
    assert section["macro_f1_5"] == pytest.approx(report_5["macro avg"]["f1-score"], abs=1e-6)
    for key in SUMMARY:
        low, high = section[f"{key}_ci95"]
        assert low <= section[key] <= high and low < high, key
    for name in CONDITIONS:
        entry = section["per_observation"][name]
        assert entry["f1"] == pytest.approx(report_14[name]["f1-score"], abs=1e-6)
        assert entry["support"] == report_14[name]["support"]
    assert "overall" not in json.loads((out / "metrics.json").read_text())  # only what --metrics asked for
    assert (out / "chexbert_f1.png").read_bytes().startswith(PNG)
    rows = list(csv.DictReader((out / "chexbert_labels.csv").open(encoding="utf-8")))
    assert len(rows) == 4 * len(expected["refs"])
    first_ref = next(r for r in rows if r["row"] == "1" and r["report"] == "reference" and r["convention"] == "rrg")
    assert [int(first_ref[name]) for name in CONDITIONS] == labels["refs_rrg"][0]


def test_fixture_edge_cases_are_in_play(expected, labeler):
    """The long reference really is cut (so truncation is tested) and the empty report is [CLS] [SEP]."""
    lengths = [len(encode_report(text, labeler.tokenizer)) for text in expected["refs"] + expected["hyps"]]
    assert max(lengths) == 512
    assert encode_report("  \n ", labeler.tokenizer) == [labeler.tokenizer.cls_token_id, labeler.tokenizer.sep_token_id]
    assert clean_report("  No acute\ncardiopulmonary   abnormality.\n\n ") == "No acute cardiopulmonary abnormality."


@pytest.mark.parametrize("batch_size", [2, 7, 64])
def test_batched_labels_equal_one_at_a_time(expected, labeler, batch_size):
    """Padding with an attention mask changes no label (reports of very different lengths share batches)."""
    reports = expected["refs"] + expected["hyps"]
    single = labeler.label_classes(reports, batch_size=1)
    assert labeler.label_classes(reports, batch_size=batch_size) == single
    assert len({tuple(row) for row in single}) > 5  # the labels vary, so equality is not trivial


def test_label_reports_writes_chexbert_convention(fixture_dir, expected, tmp_path, capsys):
    config = write_config(tmp_path, fixture_dir / "chexbert.pth", fixture_dir / "bert_base_uncased_tiny")
    source = tmp_path / "reports.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["report"], *[[text] for text in expected["refs"]]])
    out = tmp_path / "labels.csv"
    assert main(["label-reports", str(source), "--out", str(out), "-c", str(config)]) == 0
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["report", *CONDITIONS]
    wanted = [[str(v) for v in row] for row in expected["labels"]["refs_classification"]]
    assert [row[1:] for row in rows[1:]] == wanted
    assert [row[0] for row in rows[1:]] == expected["refs"]
    capsys.readouterr()
    assert main(["label-reports", str(source), "-c", str(config)]) == 0  # no --out: the same CSV on stdout
    assert capsys.readouterr().out == out.read_text(encoding="utf-8")


def test_missing_files_give_the_missing_weights_message(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.csv", ["Heart size normal."], ["No effusion."])
    config = write_config(tmp_path, tmp_path / "absent.pth", tmp_path / "absent_bert")
    code = main(["evaluate", "--task", "report", "--data", str(pairs), "--metrics", "chexbert,bleu", "-c",
                 str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert "Missing weights for evaluation.chexbert.weights" in err and str(tmp_path / "absent.pth") in err
    assert "StanfordAIMI/RRG_scorers" in err  # how to get it
    assert not (tmp_path / "out").exists()  # nothing scored, nothing written
    bare = tmp_path / "bare.yaml"
    bare.write_text("runtime:\n  mode: fp32\n", encoding="utf-8")
    assert main(["label-reports", str(pairs), "-c", str(bare)]) == 3
    assert "(no sources configured)" in capsys.readouterr().err


def test_unknown_checkpoint_keys_are_named(fixture_dir):
    state = torch.load(fixture_dir / "chexbert.pth", map_location="cpu", weights_only=True)["model_state_dict"]
    bert, heads = remap_chexbert(state)
    assert len(heads) == 28 and "embeddings.position_ids" not in bert
    assert "module.bert.pooler.dense.weight" in state  # the input is untouched
    with pytest.raises(BadInputError, match="module.classifier.weight"):
        remap_chexbert({**state, "module.classifier.weight": torch.zeros(2)})


def test_wrong_sized_config_is_refused(fixture_dir, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    config = json.loads((fixture_dir / "bert_base_uncased_tiny" / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    (bert / "vocab.txt").write_bytes((fixture_dir / "bert_base_uncased_tiny" / "vocab.txt").read_bytes())
    with pytest.raises(BadInputError, match="missing keys"):
        CheXbertLabeler.from_files(fixture_dir / "chexbert.pth", bert)


def test_vectorised_f1_equals_scikit_learn():
    rng = np.random.default_rng(3)
    for _ in range(20):
        refs = rng.integers(0, 2, (15, 14)) * (rng.random((15, 14)) < 0.6)
        hyps = rng.integers(0, 2, (15, 14))
        report = classification_report(refs, hyps, output_dict=True, zero_division=0)
        micro, macro = f1_scores(refs, hyps)
        assert micro == pytest.approx(report["micro avg"]["f1-score"])
        assert macro == pytest.approx(report["macro avg"]["f1-score"])


def test_metrics_option_and_comparison_table():
    assert parse_metrics("chexbert, BLEU,rouge,bleu") == ["chexbert", "bleu", "rouge"]
    with pytest.raises(BadInputError, match="radgraph"):
        parse_metrics("bleu,radgraph")
    first = {"overall": {"bleu4": 0.1, "rougeL": 0.2}, "overall_ci95": {"bleu4": [0.05, 0.15], "rougeL": [0.1, 0.3]}}
    second = {"overall": {"bleu4": 0.3, "rougeL": 0.25}, "overall_ci95": {"bleu4": [0.2, 0.4], "rougeL": [0.2, 0.3]}}
    rows = comparison_rows(first, second)
    assert [(r["metric"], r["intervals_overlap"]) for r in rows] == [("BLEU-4", False), ("ROUGE-L", True)]
    assert rows[0]["difference"] == pytest.approx(0.2)
    table = format_comparison(rows, "base.yaml", "tuned.yaml")
    assert "B: tuned.yaml" in table and "+0.200" in table and "0.100 [0.050, 0.150]" in table


IMAGES = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png"]


def test_compare_two_configs_on_image_rows(fixture_dir, samples_dir, tmp_path, capsys):
    """Two configs generate for the same image,report rows; A's scores equal a run of A alone, B's are in compare/."""
    second = tmp_path / "second.yaml"
    second.write_text(TINY.read_text(encoding="utf-8").replace("max_new_tokens: 20", "max_new_tokens: 6")
                      .replace("../../shared", str(samples_dir.parent)), encoding="utf-8")
    data = tmp_path / "reports.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report"])
        writer.writerows([[str(samples_dir / IMAGES[0]), "The heart is enlarged. Small left pleural effusion."],
                          [str(samples_dir / IMAGES[1]), "No acute cardiopulmonary abnormality."]])
    sets = ["--set", "generation.do_sample=false",
            "--set", f"evaluation.chexbert.weights={fixture_dir / 'chexbert.pth'}",
            "--set", f"evaluation.chexbert.bert={fixture_dir / 'bert_base_uncased_tiny'}"]
    base = ["evaluate", "--task", "report", "--data", str(data), "--metrics", "bleu,rouge,chexbert", "-c", str(TINY),
            "--bootstrap", "100", *sets]
    assert main([*base, "--out", str(tmp_path / "alone")]) == 0
    assert main([*base, "--out", str(tmp_path / "both"), "--compare-config", str(second)]) == 0
    printed = capsys.readouterr().out
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    first = json.loads((tmp_path / "both" / "metrics.json").read_text())
    other = json.loads((tmp_path / "both" / "compare" / "metrics.json").read_text())
    assert first == alone  # greedy: the same reports and scores as A on its own
    shorter = [item["generated_report"] for item in other["per_item"]]
    assert all(len(b) <= len(a["generated_report"]) for a, b in zip(first["per_item"], shorter, strict=True))
    rows = json.loads((tmp_path / "both" / "comparison.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == ["BLEU-4", "ROUGE-L", "CheXbert micro-F1 (14)", "CheXbert macro-F1 (14)",
                                           "CheXbert micro-F1 (5)", "CheXbert macro-F1 (5)"]
    assert rows[1]["first"] == first["overall"]["rougeL"] and rows[1]["second"] == other["overall"]["rougeL"]
    assert rows[2]["difference"] == pytest.approx(other["chexbert"]["micro_f1_14"] - first["chexbert"]["micro_f1_14"])
    assert "B - A" in printed and "CheXbert micro-F1 (14)" in printed and str(second) in printed
    assert (tmp_path / "both" / "compare" / "chexbert_f1.png").read_bytes().startswith(PNG)


def test_compare_needs_image_rows(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.csv", ["Heart size normal."], ["No effusion."])
    code = main(["evaluate", "--task", "report", "--data", str(pairs), "-c", str(TINY), "--compare-config", str(TINY),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "image,report rows" in capsys.readouterr().err
    code = main(["evaluate", "--task", "zeroshot", "--data", str(pairs), "-c", str(TINY), "--metrics", "chexbert"])
    assert code == 2 and "options of --task report" in capsys.readouterr().err


def test_finetune_validation_includes_chexbert_when_present(fixture_dir, expected, labeler, tmp_path, caplog):
    from xraygpt_app.config import load_config
    from xraygpt_app.evaluation.clinical import chexbert_metrics
    from xraygpt_app.train.evaluate import chexbert_scores

    refs, hyps = expected["refs"][:6], expected["hyps"][:6]
    config = load_config(write_config(tmp_path, fixture_dir / "chexbert.pth", fixture_dir / "bert_base_uncased_tiny"))
    wanted = chexbert_metrics(labeler.label_classes(refs), labeler.label_classes(hyps))
    assert chexbert_scores(config, refs, hyps) == wanted
    assert chexbert_scores(load_config(TINY), refs, hyps) is None  # not configured: not asked for
    absent = load_config(write_config(tmp_path, tmp_path / "absent.pth", fixture_dir / "bert_base_uncased_tiny"))
    assert chexbert_scores(absent, refs, hyps) is None
    assert "CheXbert F1 skipped: Missing weights for evaluation.chexbert.weights" in caplog.text


def test_default_config_names_the_hub_files_for_fetch_not_for_serve():
    from xraygpt_app.config import iter_weight_specs, load_config
    from xraygpt_app.weights import _allow, parse_hub_source

    config = load_config(REPO / "eval_configs" / "xraygpt_eval.yaml")
    fetched = iter_weight_specs(config, evaluation=True)
    assert "hf-hub:StanfordAIMI/RRG_scorers/chexbert.pth" in fetched["evaluation.chexbert.weights"].sources
    bert = fetched["evaluation.chexbert.bert"]
    assert "hf-hub:google-bert/bert-base-uncased" in bert.sources and bert.licence.startswith("Apache-2.0")
    # only the config and vocabulary of the Hub folder are downloaded, not its weights files
    wanted = ["config.json", "vocab.txt", "tokenizer_config.json"]
    assert _allow(parse_hub_source(bert.sources[-1]), bert.files) == wanted
    assert not any(name.startswith("evaluation.") for name in iter_weight_specs(config))  # serve's start-up fetch


def test_other_sizes_load_and_a_vocab_only_folder_is_sized_from_the_checkpoint(fixture_dir, expected, tmp_path,
                                                                               caplog):
    """A CheXbert of other sizes in the released format (written here with transformers' BertModel) loads from its
    config; from a folder holding only vocab.txt it gets the same sizes, and the same labels, from its tensors."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=3000, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=512)
    torch.manual_seed(1)
    bert = BertModel(config)
    heads = [torch.nn.Linear(128, 4) for _ in range(13)] + [torch.nn.Linear(128, 2)]
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i, head in enumerate(heads):
        state.update({f"module.linear_heads.{i}.{k}": v for k, v in head.state_dict().items()})
    torch.save({"epoch": 1, "model_state_dict": state}, tmp_path / "chexbert.pth")
    full, vocab_only = tmp_path / "full", tmp_path / "vocab_only"
    for folder in (full, vocab_only):
        folder.mkdir()
        (folder / "vocab.txt").write_bytes((fixture_dir / "bert_base_uncased_tiny" / "vocab.txt").read_bytes())
    config.to_json_file(full / "config.json")
    reports = expected["refs"][:8]
    labels = CheXbertLabeler.from_files(tmp_path / "chexbert.pth", full).label_classes(reports)
    assert "no config.json" not in caplog.text
    assert CheXbertLabeler.from_files(tmp_path / "chexbert.pth", vocab_only).label_classes(reports) == labels
    assert "no config.json" in caplog.text and "assuming 2 attention heads" in caplog.text
