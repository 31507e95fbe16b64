"""Fine-tuning the zero-shot models with their own training losses: MedCLIP and BiomedCLIP.

- MedCLIP: ``medclip/losses.py`` ``ImageTextContrastiveLoss``. Logits are ``exp(logit_scale)``
  (its stored value clamped to [0, ln 100] first, as ``MedCLIPModel.compute_logits`` does) times the
  cosine similarity of image and text embeddings. Without labels: the CLIP loss (cross-entropy with
  the diagonal as target, image and text directions averaged). With ``image_labels`` and
  ``text_labels``: targets ``softmax(img_labels @ text_labels.T)`` per image (and of the transpose
  per text), loss ``-(target * log_softmax(logits)).sum() / batch`` in both directions, averaged.
  The batch's texts are tokenized together (``padding=True``, at most 77 tokens) as MedCLIP's
  collator does, so padding enters the mean-pooled text embedding as at inference.
- BiomedCLIP: open_clip's own ``ClipLoss`` on ``{image, text}`` rows, the logit scale clamped to
  [0, ln 100] as open_clip's training loop keeps it.

Every parameter trains, named as in the released state dict; each epoch is also written in the
released format (MedCLIP's ``pytorch_model.bin`` folder, an open_clip folder), so ``classify``
serves it with ``--set zeroshot.models.NAME.weights=FOLDER``.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from ..config import Config, ImageConfig
from ..evaluation.metrics import macro_auc
from ..imaging.loader import load_radiograph
from ..zeroshot.classifier import build_encoder, resolve_zeroshot_weights
from .config import TrainConfig
from .data import DataError, DataSummary
from .family import TrainableFamily
from .zeroshot_data import CHEXPERT_TASKS, LabelledRow, RowDataset, collate_rows, read_rows
from .zeroshot_eval import compare_aucs, label_aucs, usable_labels, write_comparison

log = logging.getLogger(__name__)


class ZeroShotTrainable(TrainableFamily):
    """A zero-shot model of ``zeroshot.models`` (``train.model`` names it) as a trainable family."""

    checkpoint_weight = "zeroshot.models.{name}.weights"

    def __init__(self, encoder, name: str, source: Path, settings: TrainConfig):
        super().__init__(settings)
        self.encoder, self.name, self.source = encoder, name, source
        self.net = encoder.model  # a submodule: train()/eval(), zero_grad and DDP reach it
        self.checkpoint_weight = f"zeroshot.models.{name}.weights"

    @classmethod
    def from_config(cls, config: Config, settings: TrainConfig) -> ZeroShotTrainable:
        """Load the model through the zero-shot classifier's own path; every parameter trains."""
        encoder = build_encoder(config, settings.model)
        family = cls(encoder, settings.model, Path(resolve_zeroshot_weights(config, settings.model)), settings)
        family.network.requires_grad_(True)
        return family

    @property
    def network(self) -> nn.Module:
        return self.net

    def released_name(self, name: str) -> str:
        """The released state dict's name of one of the network's tensors."""
        return name

    # --- data ---------------------------------------------------------------------------------------
    @classmethod
    def read_data(cls, path: str | Path, skip_bad: bool, limits: ImageConfig | None) -> DataSummary:
        return read_rows(path, skip_bad, limits, cls.check_row)

    @classmethod
    def check_row(cls, row: LabelledRow) -> None:
        """An image-text pair (CheXpert labels optional: MedCLIP's soft loss; the AUC comparison for both)."""
        if row.text is None:
            raise DataError(f"{row.where}: needs a text (the report sentence paired with the image)")
        if row.labels is not None:
            raise DataError(f"{row.where}: 'labels' are MedKLIP's entity labels; {cls.family} reads image-text"
                            f" pairs, optionally with image_labels and text_labels (CheXpert's 14)")

    def dataset(self, samples: Sequence[LabelledRow], augment: bool, limits: ImageConfig | None) -> RowDataset:
        return RowDataset(samples, self.image_transform(augment), limits)

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, list[LabelledRow]]:
        return collate_rows(items)

    def eval_inputs(self, batch: tuple[torch.Tensor, list[LabelledRow]]) -> tuple:
        return self.step_inputs(batch, 0, 0)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter under the released state dict's name."""
        return {self.released_name(n): p for n, p in self.network.named_parameters() if p.requires_grad}

    def resume_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (BatchNorm statistics move while training), under the released names."""
        return {self.released_name(n): t for n, t in self.network.state_dict(keep_vars=True).items()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.resume_parameters().items()}

    def use_command(self, config_path: str, checkpoint: Path, export: Path | None) -> str:
        return (f"xraygpt classify -c {config_path} --model {self.name} --set {self.checkpoint_weight}={export}"
                f" IMAGE...")

    # --- did it help? -------------------------------------------------------------------------------
    def truth(self, rows: Sequence[LabelledRow]) -> tuple[list[str], np.ndarray]:
        """Label names and an (images, labels) matrix of 1 / 0 / NaN (unknown) from CheXpert's image_labels."""
        values = [row.image_labels or (0.0,) * len(CHEXPERT_TASKS) for row in rows]
        table = np.array([[{1.0: 1.0, -1.0: 0.0}.get(v, np.nan) for v in row] for row in values], dtype=float)
        return list(CHEXPERT_TASKS), table

    @torch.no_grad()
    def scores(self, rows: Sequence[LabelledRow], names: Sequence[str], config: Config) -> np.ndarray:
        """(images, labels) logits of the zero-shot classifier on this model (the config's templates)."""
        from ..zeroshot.classifier import ZeroShotClassifier

        self.eval()
        zs = config.zeroshot
        classifier = ZeroShotClassifier(self.encoder, self.name, ensemble=zs.ensemble, batch_size=zs.batch_size,
                                        templates=zs.models[self.name].templates, cache_size=0)
        images = [load_radiograph(row.image, config.image).image for row in rows]
        return classifier.logits(images, classifier.prompt_set(labels=list(names))).float().cpu().numpy()

    def _labelled(self, rows: Sequence[LabelledRow]) -> tuple[list[str], np.ndarray] | None:
        if not rows:
            return None
        names, truth = self.truth(rows)
        keep = usable_labels(names, truth)
        return ([names[c] for c in keep], truth[:, keep]) if keep else None

    def validation_metrics(self, val_samples: Sequence[LabelledRow], config: Config) -> dict | None:
        labelled = self._labelled(val_samples)
        if labelled is None:
            return None
        names, truth = labelled
        aucs = label_aucs(truth, self.scores(val_samples, names, config))
        return {"macro_auc": macro_auc(aucs), "auc": dict(zip(names, aucs, strict=True))}

    def end_of_run(self, val_samples: Sequence[LabelledRow], config: Config, output_dir: Path) -> dict | None:
        """AUC per label of the starting model (loaded again from the config) and the fine-tuned one."""
        labelled = self._labelled(val_samples)
        if labelled is None:
            log.info("no validation row has labels with both classes: no AUC comparison")
            return None
        names, truth = labelled
        tuned = self.scores(val_samples, names, config)
        start = type(self).from_config(config, self.settings)
        before = start.scores(val_samples, names, config)
        del start
        result = compare_aucs(names, truth, before, tuned)
        write_comparison(result, output_dir / "auc_comparison.json")
        return {"auc_comparison": result}


class MedCLIPTrainable(ZeroShotTrainable):
    """MedCLIP (ViT or ResNet) with its ``ImageTextContrastiveLoss`` (see the module docstring)."""

    family = "medclip"
    loss_name = "MedCLIP contrastive loss"

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """MedCLIP's preprocessing; with ``augment`` after the flip and jitter its dataset has (commented out)."""
        from ..zeroshot.medclip import medclip_preprocess

        if not augment:
            return medclip_preprocess
        return transforms.Compose([transforms.RandomHorizontalFlip(0.5), transforms.ColorJitter(0.1, 0.1),
                                   medclip_preprocess])

    def released_name(self, name: str) -> str:
        """MedCLIP's released names are transformers 4.24's (Swin blocks were renamed since)."""
        from ..zeroshot.medclip import released_key

        return released_key(name)

    def step_inputs(self, batch: tuple[torch.Tensor, list[LabelledRow]], seed: int, iteration: int) -> tuple:
        pixels, rows = batch
        tokens = self.encoder.tokenizer([row.text for row in rows])  # one batch: padding as MedCLIP's collator
        soft = [row.image_labels is not None for row in rows]
        if any(soft) and not all(soft):
            raise DataError("a batch mixes rows with and without image_labels/text_labels: MedCLIP's loss takes one"
                            " kind per batch; give every row labels, or none")
        if not all(soft):
            return pixels, tokens["input_ids"], tokens["attention_mask"], None, None
        return (pixels, tokens["input_ids"], tokens["attention_mask"],
                torch.tensor([row.image_labels for row in rows]), torch.tensor([row.text_labels for row in rows]))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_labels: torch.Tensor | None, text_labels: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MedCLIP's loss for the batch, number of rows)."""
        device = self.encoder.device
        loss = medclip_loss(self.network, pixel_values.to(device), input_ids.to(device), attention_mask.to(device),
                            None if image_labels is None else image_labels.to(device),
                            None if text_labels is None else text_labels.to(device))
        return loss, torch.tensor(len(pixel_values), device=device)

    def save_epoch(self, output_dir: Path, epoch: int) -> Path:
        """``medclip_<epoch>/pytorch_model.bin`` in MedCLIP's released layout (what ``weights`` reads)."""
        from ..zeroshot.medclip import WEIGHTS_NAME, export_medclip_state_dict

        folder = output_dir / f"{self.name}_{epoch}"
        return _write_folder(folder, {WEIGHTS_NAME: export_medclip_state_dict(self.network)})


class BiomedCLIPTrainable(ZeroShotTrainable):
    """BiomedCLIP (any open_clip folder) with open_clip's ``ClipLoss``."""

    family = "biomedclip"
    loss_name = "CLIP loss (open_clip)"

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's training augmentation for this model, or its eval preprocessing (RGB input)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(**self.network.visual.preprocess_cfg)
        transform = image_transform_v2(cfg, is_train=augment)
        return lambda image: transform(image.convert("RGB"))

    def step_inputs(self, batch: tuple[torch.Tensor, list[LabelledRow]], seed: int, iteration: int) -> tuple:
        pixels, rows = batch
        return pixels, self.encoder.tokenizer([row.text for row in rows])

    def forward(self, pixel_values: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(open_clip's ClipLoss for the batch, number of rows)."""
        from open_clip.loss import ClipLoss

        model, device = self.network, self.encoder.device
        with torch.no_grad():  # open_clip's training loop keeps the scale in [0, ln 100]
            model.logit_scale.clamp_(0, math.log(100))
        images = model.encode_image(pixel_values.to(device), normalize=True)
        texts = model.encode_text(tokens.to(device), normalize=True)
        loss = ClipLoss()(images, texts, model.logit_scale.exp())
        return loss, torch.tensor(len(pixel_values), device=device)

    def save_epoch(self, output_dir: Path, epoch: int) -> Path:
        """An open_clip folder: the source folder's config and tokenizer files with this epoch's weights."""
        folder = output_dir / f"{self.name}_{epoch}"
        files = {p.name: p for p in self.source.iterdir()
                 if p.is_file() and not p.name.endswith((".bin", ".safetensors", ".pth"))}
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return _write_folder(folder, {"open_clip_pytorch_model.bin": state}, copies=files)


def medclip_loss(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, image_labels: torch.Tensor | None = None,
                 text_labels: torch.Tensor | None = None) -> torch.Tensor:
    """MedCLIP's ``ImageTextContrastiveLoss`` on one batch (see the module docstring)."""
    from ..zeroshot.medclip import LOGIT_SCALE_MAX

    with torch.no_grad():  # MedCLIP clamps the stored value in place before using it
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    logits = model.logit_scale.exp() * model.encode_image(pixel_values) @ model.encode_text(input_ids, attention_mask).T
    if image_labels is None:
        return clip_loss(logits)  # (images, texts), the diagonal pairs
    similarity = image_labels @ text_labels.T
    image_side = soft_cross_entropy(logits, similarity.softmax(1))
    return (image_side + soft_cross_entropy(logits.T, similarity.T.softmax(1))) / 2


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the diagonal as target, in both directions, averaged (MedCLIP's ``clip_loss``)."""
    target = torch.arange(len(logits), device=logits.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MedCLIP's ``_soft_xent_loss``: ``-(target * log_softmax(logits)).sum() / rows``."""
    return -(target * nn.functional.log_softmax(logits, dim=1)).sum() / logits.shape[0]


def _write_folder(folder: Path, tensors: dict[str, dict], copies: dict[str, Path] | None = None) -> Path:
    """Write a released-format folder beside ``folder`` and swap it in (a failed write keeps the old one)."""
    from .outputs import save_folder_atomically

    def write(target: Path) -> None:
        target.mkdir(parents=True)
        for name, source in (copies or {}).items():
            shutil.copyfile(source, target / name)
        for name, state in tensors.items():
            torch.save(state, target / name)

    save_folder_atomically(write, folder)
    return folder
