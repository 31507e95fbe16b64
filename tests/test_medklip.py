"""The tiny MedKLIP fixture through the CLI: our production path must reproduce MedKLIP's own outputs.

Reference outputs (../shared/fixtures/medklip_tiny/expected.json) come from MediaBrain-SJTU/MedKLIP's
zero-shot and grounding test code; tolerances are the fixture README's (probabilities 1e-4, maps 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from xraygpt_app.cli import main
from xraygpt_app.config import load_config
from xraygpt_app.errors import BadInputError
from xraygpt_app.zeroshot.medklip import MedKLIP, MedKLIPSizes, build_medklip, remap_medklip_state_dict
from xraygpt_app.zeroshot.medklip_text import CACHE_FOLDER, load_tokenizer, medklip_token_ids

FIXTURE = REPO.parent / "shared" / "fixtures" / "medklip_tiny"  # read only through the shared_dir fixture


@pytest.fixture(scope="module")
def expected(shared_dir) -> dict:
    return json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def images(expected, samples_dir) -> list[str]:
    """The fixture's three radiographs (PA 512 px, AP bedside 640 x 524, PA JPEG 2000 px)."""
    return [str(samples_dir / case["image"]) for case in expected["cases"]]


@pytest.fixture
def config_path(tmp_path, monkeypatch, shared_dir) -> Path:
    """An eval_configs-style YAML as users (and the hidden fixtures) write it; the query cache goes to tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "medklip.yaml"
    path.write_text(medklip_yaml(f'"{FIXTURE / "observation explanation.json"}"') + "runtime:\n  device: cpu\n",
                    encoding="utf-8")
    return path


def medklip_yaml(descriptions: str, head: str = "") -> str:
    """The tiny fixture's zeroshot section; ``descriptions`` is the entity_descriptions value (YAML)."""
    return f"""{head}zeroshot:
  default_model: medklip
  models:
    medklip:
      kind: medklip
      weights: {FIXTURE / 'checkpoint_final.pth'}
      text_config: {FIXTURE / 'bert_tiny'}
      entity_descriptions: {descriptions}
"""


def classify_json(capsys, config_path: Path, images: list[str], *args: str) -> list[dict]:
    assert main(["classify", *images, "-c", str(config_path), "--model", "medklip", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["results"]


def test_cli_reproduces_medklip_probabilities_and_grounding(capsys, config_path, expected, images):
    grounded = ",".join(expected["cases"][0]["grounding_14x14"])
    results = classify_json(capsys, config_path, images, "--labels", "all", "--grounding", grounded)
    for case, result in zip(expected["cases"], results, strict=True):
        assert list(result["probabilities"]) == expected["entities"]
        got = np.array([result["probabilities"][e] for e in expected["entities"]])
        want = np.array([case["entity_probs"][e] for e in expected["entities"]])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert set(result["grounding"]) == set(case["grounding_14x14"])
        for entity, grid in case["grounding_14x14"].items():
            assert np.array(result["grounding"][entity]).shape == (14, 14)
            np.testing.assert_allclose(result["grounding"][entity], grid, atol=1e-5, rtol=0)


def test_cli_cxr14_preset_is_medklips_mapping(capsys, config_path, expected, images):
    results = classify_json(capsys, config_path, images, "--preset", "cxr14")
    for case, result in zip(expected["cases"], results, strict=True):
        assert list(result["probabilities"]) == expected["cxr14_classes"]
        for name, value in case["cxr14_probs"].items():
            assert result["probabilities"][name] == pytest.approx(value, abs=1e-4)


def test_chexpert5_preset_maps_our_label_names(capsys, config_path, expected, images):
    result = classify_json(capsys, config_path, images, "--preset", "chexpert5")[0]
    assert result["probabilities"]["Pleural Effusion"] == pytest.approx(
        expected["cases"][0]["entity_probs"]["effusion"], abs=1e-4)


def test_custom_finding_is_one_more_query_through_the_same_bert(capsys, config_path, tmp_path, expected, images):
    """A finding's description -> BERT [CLS] -> a 76th query beside MedKLIP's 75 (computed here by hand)."""
    from xraygpt_app.zeroshot.classifier import load_classifier

    descriptions = json.loads((FIXTURE / "observation explanation.json").read_text(encoding="utf-8"))
    cancer = "A malignant tumour of the lung, seen as a mass or nodule."
    prompts = tmp_path / "findings.yaml"
    prompts.write_text(json.dumps({"my effusion": descriptions["effusion"], "lung cancer": cancer}), encoding="utf-8")
    results = classify_json(capsys, config_path, images, "--prompts", str(prompts), "--grounding", "lung cancer")
    classifier = load_classifier(load_config(config_path))
    queries = torch.cat([classifier.query_matrix({e: [t] for e, t in classifier.descriptions.items()}),
                         classifier.encoder([cancer])])
    for case, image, result in zip(expected["cases"], images, results, strict=True):
        assert result["probabilities"]["my effusion"] == pytest.approx(case["entity_probs"]["effusion"], abs=1e-4)
        with torch.no_grad():
            out = classifier.model(classifier.pixel_values([Image.open(image)]), queries)
        assert result["probabilities"]["lung cancer"] == pytest.approx(float(out.probabilities()[0, -1]), abs=1e-5)
        np.testing.assert_allclose(result["grounding"]["lung cancer"], out.grounding()[0, -1].numpy(), atol=1e-6)


def test_a_finding_without_description_is_named(capsys, config_path, images):
    code = main(["classify", images[0], "-c", str(config_path), "--labels", "effusion,lung cancer"])
    assert code == BadInputError.exit_code
    err = capsys.readouterr().err
    assert "'lung cancer' is not one of MedKLIP's 75 entities and has no description" in err
    assert "--prompts" in err


def test_grounding_needs_scored_labels_and_medklip(capsys, config_path, images):
    code = main(["classify", images[0], "-c", str(config_path), "--preset", "chexpert5", "--grounding", "tube"])
    assert code == BadInputError.exit_code
    assert "not scored: tube" in capsys.readouterr().err


def test_entity_queries_are_cached_on_disk_by_file_hashes(config_path, tmp_path):
    from xraygpt_app.zeroshot.classifier import load_classifier

    config = load_config(config_path)
    first = load_classifier(config)
    cached = list((tmp_path / "cache" / "xraygpt-app" / CACHE_FOLDER).glob("*.pt"))
    assert len(cached) == 1
    assert len(cached[0].stem) == 64
    second = load_classifier(config)
    assert second.encoder._bert is None  # a cache hit never loads BERT
    prompt_set = first.prompt_set(labels=["all"])
    torch.testing.assert_close(second.query_matrix(prompt_set), first.query_matrix(prompt_set))


def test_token_ids_start_with_cls_and_have_no_sep(tmp_path, shared_dir):
    tokenizer = load_tokenizer(FIXTURE / "bert_tiny")
    ids, mask = medklip_token_ids(tokenizer, ["Effusion", "word " * 100])
    assert ids[0, 0] == tokenizer.cls_token_id
    assert tokenizer.sep_token_id not in ids.tolist()[0]
    assert ids.shape == (2, 64)
    assert mask[1].sum() == 64
    assert mask[0].sum() == 1 + len(tokenizer.tokenize("Effusion"))
    (tmp_path / "vocab.txt").write_bytes((FIXTURE / "bert_tiny" / "vocab.txt").read_bytes())
    assert load_tokenizer(tmp_path).tokenize("Hello") == load_tokenizer(FIXTURE / "bert_tiny").tokenize("hello")


def test_remap_is_pure_and_names_unknown_keys():
    released = {"module.classifier.weight": torch.zeros(2, 4), "module.res_l1.bias": torch.zeros(4)}
    before = dict(released)
    assert set(remap_medklip_state_dict(released)) == {"classifier.weight", "res_l1.bias"}
    assert released == before
    with pytest.raises(BadInputError, match="module.text_encoder.x"):
        remap_medklip_state_dict({**released, "module.text_encoder.x": torch.zeros(1)})


def test_resnet50_training_checkpoint_loads_strictly(tmp_path):
    """A ResNet-50 model with 8 heads saved as MedKLIP's trainer does (optimizer and scheduler included)."""
    torch.manual_seed(0)
    sizes = MedKLIPSizes("resnet50", d_model=64, layers=2, heads=8, text_dim=32, classes=2, ffn=128)
    model = MedKLIP(sizes).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint_state.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
                "lr_scheduler": {"t_initial": 100}, "config": {"H": 8, "res_base_model": "resnet50"}, "epoch": 3}, path)
    loaded = build_medklip(path)
    assert loaded.sizes == sizes
    assert loaded.res_features[6][0].conv3.weight.shape[0] == 1024
    pixels, queries = torch.randn(1, 3, 224, 224), torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels, queries).logits, model(pixels, queries).logits)
        assert loaded(pixels, queries).grounding().shape == (1, 5, 14, 14)


def test_stretched_map_geometry():
    """MedKLIP squeezes the image to 224 x 224: grid cell (r, c) covers the same fraction of each side."""
    from xraygpt_app.explain.geometry import to_image
    from xraygpt_app.explain.medklip_maps import medklip_geometry

    width, height, row, col = 640, 524, 3, 10
    grid = np.zeros((14, 14), dtype=np.float32)
    grid[row, col] = 1.0
    image_map = to_image(grid, medklip_geometry(Image.new("L", (width, height))))
    assert image_map.shape == (height, width)
    assert not np.isnan(image_map).any()  # nothing is cropped
    ys, xs = np.nonzero(image_map > 0.5)  # bilinear: the half-height contour spans exactly the cell
    assert xs.min() == pytest.approx(col * width / 14, abs=1.5)
    assert xs.max() == pytest.approx((col + 1) * width / 14, abs=1.5)
    assert ys.min() == pytest.approx(row * height / 14, abs=1.5)
    assert ys.max() == pytest.approx((row + 1) * height / 14, abs=1.5)


def test_heatmap_dir_draws_the_grounding_maps(capsys, config_path, tmp_path, images):
    folder = tmp_path / "maps"
    assert main(["classify", images[1], "-c", str(config_path), "--labels", "pneumonia,effusion", "--heatmap",
                 str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["hannover_00870a9c_ap_bedside_640x524_effusion.png",
                                                        "hannover_00870a9c_ap_bedside_640x524_pneumonia.png"]
    assert "attends" in capsys.readouterr().out


def test_attention_heatmap_is_the_raw_grounding(config_path, expected, images):
    from xraygpt_app.explain import zeroshot_heatmaps
    from xraygpt_app.zeroshot.classifier import load_classifier

    classifier = load_classifier(load_config(config_path))
    image = Image.open(images[1])
    (heatmap,) = zeroshot_heatmaps(classifier, image, labels=["pneumonia"])
    raw = np.array(expected["cases"][1]["grounding_14x14"]["pneumonia"])
    np.testing.assert_allclose(heatmap.raw_grid, raw, atol=1e-5)
    assert "cross-attention" in heatmap.method
    assert heatmap.image_map.shape == (524, 640)
    (cam,) = zeroshot_heatmaps(classifier, image, labels=["pneumonia"], method="grad-cam")
    assert cam.grid.shape == (14, 14)
    assert "Grad-CAM" in cam.method


def test_evaluate_means_lie_within_the_per_class_aucs(capsys, config_path, tmp_path, images):
    csv = tmp_path / "labels.csv"
    rows = ["image,Atelectasis,Cardiomegaly,Effusion,Pneumonia"]
    flags = ["1,0,1,0", "0,1,1,1", "1,1,0,0", "0,0,0,1"]
    for image, flag in zip([*images, images[0]], flags, strict=True):
        rows.append(f"{image},{flag}")
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--task", "zeroshot", "--data", str(csv), "-c", str(config_path), "--model", "medklip",
                 "--out", str(out), "--bootstrap", "50"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    aucs = [entry["auc"] for entry in metrics["per_class"].values()]
    assert len(aucs) == 4
    assert all(a is not None for a in aucs)
    assert min(aucs) <= metrics["macro_auc"] <= max(aucs)
    assert metrics["macro_auc"] == pytest.approx(np.mean(aucs))
    assert (out / "roc.png").is_file()
    assert (out / "auc_per_class.png").is_file()


def test_the_real_config_says_where_each_file_comes_from(shared_dir):
    """fetch/check see MedKLIP's three files: the pinned descriptions URL with the file's own sha256."""
    import hashlib
    import re

    from xraygpt_app.config import iter_weight_specs
    from xraygpt_app.weights import resolve_weights

    config = load_config(REPO / "eval_configs" / "xraygpt_eval.yaml")
    specs = iter_weight_specs(config)
    described = specs["zeroshot.models.medklip.entity_descriptions"]
    (url,) = described.sources
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/MediaBrain-SJTU/MedKLIP/[0-9a-f]{40}/.+\.json", url)
    digest = hashlib.sha256((FIXTURE / "observation explanation.json").read_bytes()).hexdigest()
    assert described.sha256 == digest
    assert specs["zeroshot.models.medklip.text_config"].sources == [
        "hf-hub:emilyalsentzer/Bio_ClinicalBERT/pytorch_model.bin"]
    checkpoint = specs["zeroshot.models.medklip.weights"]
    assert all(not s.startswith(("http", "hf-hub")) for s in checkpoint.sources)  # Google Drive: manual
    with pytest.raises(Exception, match="Google Drive") as missing:
        resolve_weights(checkpoint, "zeroshot.models.medklip.weights")
    assert "checkpoints/medklip/checkpoint_final.pth" in str(missing.value)


def test_fetch_downloads_the_descriptions_then_classify_uses_them(capsys, server, tmp_path, shared_dir, images):
    """The descriptions come from a URL with their sha256 (here a loopback server): fetch, then classify."""
    import hashlib

    base, www = server
    source = FIXTURE / "observation explanation.json"
    (www / source.name).write_bytes(source.read_bytes())
    config = tmp_path / "fetched.yaml"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    config.write_text(medklip_yaml(f'{{sources: ["{base}/observation%20explanation.json"], sha256: {digest}}}',
                                   head=f"weights:\n  cache_dir: {tmp_path / 'cache'}\n"), encoding="utf-8")
    main(["check", "-c", str(config)])
    assert "`xraygpt fetch` downloads it" in capsys.readouterr().out
    main(["fetch", "-c", str(config)])  # the XrayGPT entries stay missing (exit 3): only the descriptions matter
    assert "downloaded  zeroshot.models.medklip.entity_descriptions" in capsys.readouterr().out
    assert main(["classify", images[0], "-c", str(config), "--labels", "effusion", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["probabilities"]["effusion"] > 0


def test_a_one_model_config_needs_no_default_model(capsys, tmp_path, shared_dir, images):
    config = tmp_path / "only.yaml"
    config.write_text(medklip_yaml(f'"{FIXTURE / "observation explanation.json"}"').replace(
        "  default_model: medklip\n", "").replace("    medklip:\n", "    medklip-tiny:\n"), encoding="utf-8")
    assert main(["classify", images[0], "-c", str(config), "--preset", "cxr14", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["model"] == "medklip-tiny"


def test_chart_shows_one_probability_per_label(capsys, config_path, tmp_path, images):
    """MedKLIP's probabilities do not compete across labels: the chart draws them as one series."""
    from matplotlib.figure import Figure

    from xraygpt_app.charts import _score_panel
    from xraygpt_app.zeroshot.medklip_classifier import EntityResult

    chart = tmp_path / "chart.png"
    assert main(["classify", images[0], "-c", str(config_path), "--preset", "cxr14", "--chart", str(chart)]) == 0
    assert chart.read_bytes().startswith(b"\x89PNG")
    result = EntityResult(["effusion", "tube"], [0.1, -0.2], [0.52, 0.45], "effusion")
    assert not result.across_labels
    ax = Figure().subplots()
    _score_panel(ax, result.labels, result.probabilities, None, result.predicted, "one series")
    assert len(ax.patches) == 2
    assert [t.get_label() for t in ax.containers] == ["probability present (per label)"]
