"""Typed, validated configuration loaded from YAML in ``eval_configs/``.

Every architecture dimension is a field whose default is the real XrayGPT value, so a tiny test model
runs through exactly the same code path as the real one. Unknown keys are errors that name the file
and the key (the reference's ``cfg.get(key, default)`` silently ignores typos). ``llm_server``: serverconfig.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .families.registry import FAMILIES, family_spec
from .serving.config import LLMServerConfig, check_backend
from .yamlconfig import absolute_path, build_section, read_raw_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "eval_configs" / "xraygpt_eval.yaml"


@dataclass
class WeightSpec:
    """Where one weights file (or folder) can be found.

    ``sources`` are tried in order; each is a local path, ``hf-hub:org/repo[/file]`` or an
    https URL. ``how_to_get`` is shown when none of them is available.
    """

    SHORTHAND_FIELD = "sources"  # a bare path or list in YAML means the sources

    sources: list[str] = field(default_factory=list)
    sha256: str | None = None
    how_to_get: str = ""
    licence: str = ""  # shown before a download, e.g. "MIT (MedCLIP's repository)"
    files: list[str] = field(default_factory=list)  # a Hub folder: only these files (patterns); empty: all


TOWER_SELECTIONS = ("patch", "cls_patch")  # LLaVA's mm_vision_select_feature
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")  # LLaVA-1.5's mm_projector_type values we build


@dataclass
class ModelConfig:
    """Which architecture the config builds; everything else in the app is the same for both.

    ``xraygpt``: EVA ViT-g -> Q-Former -> linear projection -> LLaMA (sections vision, qformer).
    ``llava``: an open_clip image tower's patch tokens -> LLaVA-1.5 projector -> any chat LLM
    (sections tower, projector; weights.vision_tower, weights.projector, weights.llama_model).
    """

    family: str = "xraygpt"
    name: str = ""  # shown on the app's "model" line; empty: the weights' names


@dataclass
class TowerConfig:
    """The llava family's vision tower: any open_clip model (BiomedCLIP first), frozen.

    ``layer``: the transformer block whose output feeds the projector (negative counts from the
    end; LLaVA-1.5 reads the penultimate, -2). ``select``: ``patch`` drops the class token (196
    tokens for a ViT-B/16 at 224 px, LLaVA-1.5's default), ``cls_patch`` keeps it.
    ``text_config``: as for zero-shot BiomedCLIP, an optional local folder for the text tower's
    config.json (open_clip builds the whole CLIP model; only its image tower is kept).
    """

    layer: int = -2
    select: str = "patch"
    text_config: str | None = None


@dataclass
class ProjectorConfig:
    """LLaVA-1.5's projector from the tower width to the LLM hidden size (both read from the models)."""

    type: str = "mlp2x_gelu"  # Linear -> GELU -> Linear; or "linear"


@dataclass
class VisionConfig:
    """EVA ViT-g as LAVIS builds it for XrayGPT (``create_eva_vit_g``)."""

    image_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1408
    depth: int = 39  # LAVIS drops the 40th block of EVA-g
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5
    precision: str = "fp16"  # XrayGPT's vit_precision; "fp32" keeps it float32 everywhere
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base) with 32 query tokens."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    max_position_embeddings: int = 512
    vocab_size: int = 30522


@dataclass
class LLMConfig:
    """The language model; its own dims come from the Hugging Face folder's config.json."""

    hidden_size: int = 4096  # xraygpt: checked against the folder's config.json; llava: read from it
    max_length: int = 2000  # XrayGPT's max_length: prompt + new tokens
    use_fast_tokenizer: bool = False


@dataclass
class GenerationConfig:
    """Defaults of XrayGPT's ``Chat.answer`` in the demo."""

    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = True
    top_p: float = 0.9
    temperature: float = 1.0
    min_length: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    stop_string: str = "###"  # xraygpt; the llava family stops on its chat template's end of turn
    seed: int | None = None


@dataclass
class RuntimeConfig:
    """Precision and placement; ``llm.placement.plan_placement`` turns this into dtypes/devices.

    mode: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp16``, ``8bit``, ``4bit``, ``low_resource``,
    ``fp32``, ``bf16``.
    """

    mode: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    vision_device: str = "auto"  # auto (as the mode says) | cpu: the ViT in float32 on the CPU, saving GPU memory
    compile: bool = False  # static KV cache + torch.compile'd decode step (see xraygpt_app/kvcache.py)
    llm_backend: str = "transformers"  # transformers (in process) | vllm (a vLLM server: section llm_server)


@dataclass
class WeightsConfig:
    """The files a user of XrayGPT already has, under XrayGPT's own names, and the llava family's.

    ``llama_model`` is the LLM folder of both families (any Hugging Face causal LM for llava).
    """

    ckpt: WeightSpec = field(default_factory=WeightSpec)
    llama_model: WeightSpec = field(default_factory=WeightSpec)
    eva_vit_g: WeightSpec = field(default_factory=WeightSpec)
    blip2_qformer: WeightSpec = field(default_factory=WeightSpec)
    vision_tower: WeightSpec = field(default_factory=WeightSpec)  # llava: open_clip folder or hf-hub:org/repo
    projector: WeightSpec = field(default_factory=WeightSpec)  # llava: the trained projector (safetensors)
    cache_dir: str | None = None  # for URL downloads; the Hub uses huggingface_hub's cache
    lora: str | None = None  # a peft LoRA adapter folder (from `xraygpt finetune`), applied on top of the LLM


@dataclass
class ImageConfig:
    """Limits for uploaded radiographs (checked before decoding)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 60_000_000
    min_side: int = 64


@dataclass
class ZeroShotModelConfig:
    """One zero-shot model: MedCLIP (``medclip-vit``/``medclip-resnet``) or BiomedCLIP.

    ``weights``: MedCLIP's ``pytorch_model.bin`` (the file, its folder or the released zip); for
    BiomedCLIP an open_clip folder (``open_clip_config.json`` + weights) or ``hf-hub:org/repo``.
    ``vision_config``/``text_config``: MedCLIP's Swin and BERT config folders (or ``hf-hub:`` ids);
    for BiomedCLIP, ``text_config`` optionally replaces the text tower's Hub config with a local folder.
    ``templates``: prompt templates for typed labels (empty: the model's own default).
    MedKLIP (``medklip``): ``weights`` is its ``checkpoint_final.pth``, ``text_config`` the BERT folder
    (Bio_ClinicalBERT, weights included) and ``entity_descriptions`` its ``observation explanation.json``.
    """

    kind: str = ""  # medclip-vit | medclip-resnet | biomedclip | medklip
    weights: WeightSpec = field(default_factory=WeightSpec)
    vision_config: str | None = None
    text_config: str | None = None
    templates: list[str] = field(default_factory=list)
    entity_descriptions: WeightSpec = field(default_factory=WeightSpec)  # medklip only


ZEROSHOT_KINDS = ("medclip-vit", "medclip-resnet", "biomedclip", "medklip")
ENSEMBLES = ("mean", "max")  # how a label's prompt logits combine


@dataclass
class ZeroShotConfig:
    """Zero-shot classification defaults shared by the CLI, the app and evaluation."""

    models: dict[str, ZeroShotModelConfig] = field(default_factory=dict)
    default_model: str = "medclip-vit"
    preset: str = "chexpert5"  # chexpert5 | covid | rsna
    ensemble: str = "mean"  # mean (MedCLIP) | max
    prompts_per_class: int | None = None  # None: every combination
    seed: int = 42  # for sampled prompts
    batch_size: int = 16
    text_cache_size: int = 32  # prompt sets whose text embeddings are kept per model


@dataclass
class CheXbertConfig:
    """CheXbert, the report labeler behind CheXbert F1 (``evaluate --metrics chexbert``, ``label-reports``).

    ``weights``: the released ``chexbert.pth``; ``bert``: a folder with bert-base-uncased's
    ``config.json`` and ``vocab.txt`` (its weights come from ``chexbert.pth``).
    """

    weights: WeightSpec = field(default_factory=WeightSpec)
    bert: WeightSpec = field(default_factory=WeightSpec)
    batch_size: int = 16


@dataclass
class EvaluationConfig:
    """Scorers of generated reports that need model files."""

    chexbert: CheXbertConfig = field(default_factory=CheXbertConfig)


@dataclass
class AppConfig:
    """The web app's serving options."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_file_size: str = "50mb"
    generation_concurrency: int | None = None  # None: 1 in process, 16 with the vllm backend (it batches them)
    queue_max_size: int = 32
    delete_cache_seconds: int = 600  # Gradio's delete_cache (frequency, age); uploads are deleted at once anyway
    session_idle_seconds: int = 1800  # a session untouched this long is forgotten: image, chat, KV cache
    # Gradio also keeps, per session, a copy of every component value it sent (previews, chats: ~2 MB a
    # session here) until the session is pushed out by newer ones; this bounds that (Gradio's default 10000).
    session_capacity: int = 1000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    app: AppConfig = field(default_factory=AppConfig)
    llm_server: LLMServerConfig = field(default_factory=LLMServerConfig)
    source: str = ""  # the file this config was read from (set by load_config)
    overrides: list[str] = field(default_factory=list)  # its --set items, to print commands that reproduce it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides, validate, and return it (relative local weight
    paths are resolved against the config file's folder)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = read_raw_config(path, overrides)
    raw.pop("train", None)  # a training config's own section, read (and checked) by xraygpt_app.train.config
    config = config_from_raw(raw, path)
    config.overrides = list(overrides)
    return config


def config_from_raw(raw: dict, path: Path) -> Config:
    """Build and validate a :class:`Config` from a mapping read from ``path``."""
    config = build_section(Config, raw, str(path), "")
    config.source = str(path)
    _resolve_relative_sources(config, path.parent)
    _validate(config, str(path))
    check_backend(config, str(path), path.parent)
    return config


def _resolve_relative_sources(config: Config, base: Path) -> None:
    """Make relative local weight paths relative to the config file, not the working dir."""
    specs = [getattr(config.weights, f.name) for f in dataclasses.fields(WeightsConfig) if f.type == "WeightSpec"]
    specs += [spec for model in config.zeroshot.models.values() for spec in (model.weights, model.entity_descriptions)]
    specs += list(evaluation_specs(config).values())
    for spec in specs:
        spec.sources = [absolute_path(s, base) for s in spec.sources]
    config.weights.lora = absolute_path(config.weights.lora, base) if config.weights.lora else None
    if config.tower.text_config:
        config.tower.text_config = absolute_path(config.tower.text_config, base)
    for model in config.zeroshot.models.values():
        model.vision_config = absolute_path(model.vision_config, base) if model.vision_config else None
        model.text_config = absolute_path(model.text_config, base) if model.text_config else None


def iter_weight_specs(config: Config, evaluation: bool = False) -> dict[str, WeightSpec]:
    """Every weights entry the config's model family reads, by a readable name (for fetch/check).

    ``evaluation``: also the report scorers' entries that the config sets (``xraygpt fetch`` and
    ``check`` list them; ``serve`` does not fetch them on start).
    """
    specs = {f"weights.{name}": getattr(config.weights, name) for name in family_spec(config.model.family).weights}
    for name, model in config.zeroshot.models.items():
        specs[f"zeroshot.models.{name}.weights"] = model.weights
        if model.kind == "medklip":
            specs[f"zeroshot.models.{name}.entity_descriptions"] = model.entity_descriptions
            specs[f"zeroshot.models.{name}.text_config"] = medklip_text_weights(model.text_config)
    if evaluation:
        specs.update({name: spec for name, spec in evaluation_specs(config).items() if spec.sources})
    return specs


def evaluation_specs(config: Config) -> dict[str, WeightSpec]:
    """The report scorers' weights entries by their key path (set or not)."""
    chexbert = config.evaluation.chexbert
    return {"evaluation.chexbert.weights": chexbert.weights, "evaluation.chexbert.bert": chexbert.bert}


def medklip_text_weights(text_config: str | None) -> WeightSpec:
    """MedKLIP runs its BERT at load time, so it needs its weights: a local folder, or the Hub repo's file."""
    hub = (text_config or "").startswith("hf-hub:")
    return WeightSpec(sources=[f"{text_config}/pytorch_model.bin" if hub else text_config] if text_config else [],
                      licence="MIT (Bio_ClinicalBERT's model card)" if hub else "",
                      how_to_get="`xraygpt fetch` downloads it from the Hub" if hub else "text_config must be a BERT"
                      " folder with weights, e.g. from `hf download emilyalsentzer/Bio_ClinicalBERT --local-dir DIR`")


RUNTIME_MODES = ("auto", "fp16", "8bit", "4bit", "low_resource", "fp32", "bf16")


def _validate(config: Config, source: str) -> None:
    """Cross-field checks that a type hint cannot express."""
    _check_choice(source, "model.family", config.model.family, tuple(FAMILIES))
    _check_choice(source, "tower.select", config.tower.select, TOWER_SELECTIONS)
    _check_choice(source, "projector.type", config.projector.type, PROJECTOR_TYPES)
    if config.runtime.mode not in RUNTIME_MODES:
        raise ConfigError(f"{source}: runtime.mode must be one of {', '.join(RUNTIME_MODES)},"
                          f" got {config.runtime.mode!r}")
    if config.runtime.vision_device not in ("auto", "cpu"):
        raise ConfigError(f"{source}: runtime.vision_device must be auto or cpu, got {config.runtime.vision_device!r}")
    if config.vision.precision not in ("fp16", "fp32"):
        raise ConfigError(f"{source}: vision.precision must be fp16 or fp32")
    if config.vision.embed_dim % config.vision.num_heads:
        raise ConfigError(f"{source}: vision.embed_dim must be divisible by vision.num_heads")
    if config.qformer.hidden_size % config.qformer.num_attention_heads:
        raise ConfigError(f"{source}: qformer.hidden_size must be divisible by qformer.num_attention_heads")
    gen = config.generation
    if gen.max_new_tokens < 1 or gen.num_beams < 1:
        raise ConfigError(f"{source}: generation.max_new_tokens and num_beams must be at least 1")
    if not 0 < gen.top_p <= 1 or gen.temperature <= 0:
        raise ConfigError(f"{source}: generation.top_p must be in (0, 1] and temperature > 0")
    if not gen.stop_string:
        raise ConfigError(f"{source}: generation.stop_string must not be empty")
    _validate_zeroshot(config.zeroshot, source)
    if config.evaluation.chexbert.batch_size < 1:
        raise ConfigError(f"{source}: evaluation.chexbert.batch_size must be at least 1")


def _check_choice(source: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, got {value!r}")


def _validate_zeroshot(zs: ZeroShotConfig, source: str) -> None:
    if zs.ensemble not in ENSEMBLES:
        raise ConfigError(f"{source}: zeroshot.ensemble must be mean or max, got {zs.ensemble!r}")
    if zs.batch_size < 1 or (zs.prompts_per_class is not None and zs.prompts_per_class < 1):
        raise ConfigError(f"{source}: zeroshot.batch_size and zeroshot.prompts_per_class must be at least 1")
    for name, model in zs.models.items():
        if model.kind not in ZEROSHOT_KINDS:
            raise ConfigError(f"{source}: zeroshot.models.{name}.kind must be one of {', '.join(ZEROSHOT_KINDS)},"
                              f" got {model.kind!r}")
        if model.kind == "medklip" and not (model.text_config and model.entity_descriptions.sources):
            raise ConfigError(f"{source}: zeroshot.models.{name} (medklip) needs text_config (the BERT folder) and"
                              " entity_descriptions (observation explanation.json)")
        if model.kind != "medklip" and model.entity_descriptions.sources:
            raise ConfigError(f"{source}: zeroshot.models.{name}.entity_descriptions is for kind medklip only")
