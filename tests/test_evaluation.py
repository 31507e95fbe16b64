"""Metrics on hand-made tables whose values are known by construction, and report metrics vs the packages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from xraygpt_app.charts import auc_chart, roc_chart, score_chart
from xraygpt_app.errors import BadInputError
from xraygpt_app.evaluation.metrics import (
    LabelTable,
    accuracy,
    bootstrap_intervals,
    macro_auc,
    per_class_auc,
    read_label_table,
    read_report_table,
    report_metrics,
    roc_curves,
    zeroshot_metrics,
)
from xraygpt_app.zeroshot.classifier import results_from_logits

PNG = b"\x89PNG\r\n\x1a\n"


def _logit(p):
    p = np.asarray(p, dtype=float)
    return np.log(p / (1 - p))


def test_auc_known_by_construction():
    # Label 0: positives score 0.9, 0.4; negatives 0.5, 0.1 -> 3 of 4 pairs ordered: AUC 0.75.
    # Label 1: every positive above every negative: 1.0. Label 2: every positive below: 0.0.
    targets = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])
    scores = np.array([[0.9, 0.8, 0.9], [0.4, 0.7, 0.8], [0.5, 0.2, 0.3], [0.1, 0.1, 0.2]])
    aucs = per_class_auc(targets, _logit(scores))
    assert aucs == pytest.approx([0.75, 1.0, 0.0])
    assert macro_auc(aucs) == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_auc_of_large_logits_is_not_tied_by_sigmoid_rounding():
    # MedCLIP logits reach 100 (scale x cosine); sigmoid(38)..sigmoid(41) are all 1.0 in float64.
    targets = np.array([[0], [1], [0], [1]])
    logits = np.array([[38.0], [41.0], [40.0], [39.5]])  # 3 of 4 (positive, negative) pairs ordered
    assert per_class_auc(targets, logits) == [pytest.approx(0.75)]
    table = LabelTable(["a", "b", "c", "d"], ["x"], targets, single_label=False)
    fpr, tpr, auc = roc_curves(table, logits)["x"]
    assert auc == pytest.approx(0.75)
    assert len(fpr) == len(tpr) > 3


def test_ties_count_half():
    targets = np.array([[1], [0]])
    assert per_class_auc(targets, np.array([[0.3], [0.3]])) == [0.5]


def test_single_class_label_gets_no_auc_and_a_note():
    table = LabelTable(["a", "b", "c"], ["x", "y"], np.array([[1, 0], [1, 0], [1, 0]]), single_label=True)
    metrics = zeroshot_metrics(table, np.array([[1.0, 0.0], [0.5, 0.2], [0.0, 1.0]]), n_resamples=50)
    assert metrics["per_class"]["x"]["auc"] is None
    assert "only positive" in metrics["per_class"]["x"]["note"]
    assert metrics["per_class"]["y"]["auc"] is None
    assert "only negative" in metrics["per_class"]["y"]["note"]
    assert metrics["macro_auc"] is None
    assert metrics["macro_auc_ci95"] is None
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"]["matrix"] == [[2, 1], [0, 0]]


def test_accuracy_single_and_multi_label():
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    logits = np.array([[3.0, -1, -2], [-1, 1, 3], [-2, -1, 2], [2, -1, 1]])
    assert accuracy(targets, logits, single_label=True) == 0.5  # rows 1 and 3 are wrong
    # Multi-label: sigmoid >= 0.5 <=> logit >= 0. Column 0 predicts [1,0,0,1] vs truth [1,0,0,0] -> 3/4;
    # column 1 [0,1,0,0] vs [0,1,0,0] -> 4/4; column 2 [0,1,1,1] vs [0,0,1,1] -> 3/4.
    assert accuracy(targets, logits, single_label=False) == pytest.approx(2.5 / 3)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    targets = np.eye(3, dtype=int)[rng.integers(0, 3, 60)]
    logits = targets * 1.5 + rng.normal(size=targets.shape)
    one = bootstrap_intervals(targets, logits, True, n_resamples=200, seed=7)
    assert one == bootstrap_intervals(targets, logits, True, n_resamples=200, seed=7)
    assert one != bootstrap_intervals(targets, logits, True, n_resamples=200, seed=8)
    aucs = per_class_auc(targets, logits)
    for c in range(3):
        low, high = one[f"auc:{c}"]
        assert low <= aucs[c] <= high
        assert high - low < 0.5
    low, high = one["accuracy"]
    assert low <= accuracy(targets, logits, True) <= high


def test_read_label_table_both_layouts(tmp_path):
    single = tmp_path / "single.csv"
    single.write_text("image,label\na.png,Edema\nb.png,Cardiomegaly\nc.png,Edema\n")
    table = read_label_table(single)
    assert table.labels == ["Cardiomegaly", "Edema"]
    assert table.single_label
    assert table.targets.tolist() == [[0, 1], [1, 0], [0, 1]]
    multi = tmp_path / "multi.csv"
    multi.write_text("path,Edema,Cardiomegaly\na.png,1,1\nb.png,0,0\n")
    table = read_label_table(multi)
    assert table.images == ["a.png", "b.png"]
    assert table.labels == ["Edema", "Cardiomegaly"]
    assert not table.single_label
    bad = tmp_path / "bad.csv"
    bad.write_text("image,Edema\na.png,maybe\n")
    with pytest.raises(BadInputError, match="0 or 1"):
        read_label_table(bad)
    for name, text, message in [("frac.csv", "image,Edema\na.png,0.7\n", "0 or 1"),
                                ("uncertain.csv", "image,Edema\na.png,-1\n", "0 or 1"),
                                ("dup.csv", "image,Edema,Edema\na.png,1,0\n", "repeated column"),
                                ("binary.csv", "image,label\na.png,1\nb.png,0\n", "holds 0/1"),
                                ("ragged.csv", "image,Edema\na.png,1\nb.png,1,0\n", "data row 2 has more fields")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(BadInputError, match=message):
            read_label_table(tmp_path / name)
    reports = tmp_path / "reports.csv"
    reports.write_text('image,report\na.png,"No acute findings."\n')
    assert read_report_table(reports) == (["a.png"], ["No acute findings."])


REFERENCES = [
    "The heart size is normal. There is no pleural effusion or pneumothorax.",
    "Moderate cardiomegaly with small bilateral pleural effusions.",
    "Lungs are clear. No acute cardiopulmonary abnormality.",
]
HYPOTHESES = [
    "Heart size is normal. No pleural effusion or pneumothorax is seen.",
    "There is cardiomegaly and a small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
]


def test_report_metrics_agree_with_sacrebleu_and_rouge_score():
    metrics = report_metrics(HYPOTHESES, REFERENCES)
    for n in range(1, 5):
        corpus = BLEU(max_ngram_order=n, lowercase=True).corpus_score(HYPOTHESES, [REFERENCES]).score / 100
        assert metrics["overall"][f"bleu{n}"] == pytest.approx(corpus)
        for hyp, ref, item in zip(HYPOTHESES, REFERENCES, metrics["per_item"], strict=True):
            sentence = BLEU(max_ngram_order=n, lowercase=True, effective_order=True).sentence_score(hyp, [ref])
            assert item[f"bleu{n}"] == pytest.approx(sentence.score / 100)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPOTHESES, REFERENCES, strict=True)]
    assert metrics["overall"]["rougeL"] == pytest.approx(np.mean(rouge))
    assert [i["rougeL"] for i in metrics["per_item"]] == pytest.approx(rouge)
    assert 0 < metrics["overall"]["bleu4"] < metrics["overall"]["bleu1"] < 1


def test_report_metrics_identical_and_disjoint_texts():
    same = report_metrics([REFERENCES[0]], [REFERENCES[0]])
    assert same["overall"] == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0, "rougeL": 1.0})
    # ROUGE-L by construction: LCS of "a b c d" and "a x c y" is "a c" -> P = R = F = 0.5.
    half = report_metrics(["a x c y"], ["a b c d"])
    assert half["overall"]["rougeL"] == pytest.approx(0.5)
    assert half["overall"]["bleu1"] == pytest.approx(0.5)  # 2 of 4 unigrams match, no brevity penalty
    with pytest.raises(BadInputError):
        report_metrics(["a"], ["a", "b"])


def test_charts_are_pngs(tmp_path):
    results = results_from_logits(torch.tensor([[0.5, -1.0, 2.0]]), ["Edema", "Cardiomegaly", "x"])
    data = score_chart(results, path=tmp_path / "scores.png")
    assert data.startswith(PNG)
    assert (tmp_path / "scores.png").read_bytes() == data
    table = LabelTable(["a", "b", "c", "d"], ["p", "q"], np.array([[1, 0], [0, 1], [1, 0], [0, 1]]), True)
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 1.0], [0.1, 0.2]])
    metrics = zeroshot_metrics(table, logits, n_resamples=20)
    assert roc_chart(roc_curves(table, logits), path=tmp_path / "roc.png").startswith(PNG)
    assert auc_chart(metrics["per_class"], metrics["macro_auc"], path=tmp_path / "auc.png").startswith(PNG)
