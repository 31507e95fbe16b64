"""MedKLIP's 75 entities and how its tests map dataset labels onto them (pure Python: the CLI and UI read it).

MedKLIP pairs the descriptions of ``observation explanation.json`` with this list by position, not by
key: the file's 21st key is spelt ``eumonia``, and its description is pneumonia's.
"""

from __future__ import annotations

ENTITIES = (
    "normal", "clear", "sharp", "sharply", "unremarkable", "intact", "stable", "free",
    "effusion", "opacity", "pneumothorax", "edema", "atelectasis", "tube", "consolidation", "process", "abnormality",
    "enlarge", "tip", "low", "pneumonia", "line", "congestion", "catheter", "cardiomegaly", "fracture", "air",
    "tortuous", "lead", "disease", "calcification", "prominence", "device", "engorgement", "picc", "clip",
    "elevation", "expand", "nodule", "wire", "fluid", "degenerative", "pacemaker", "thicken", "marking", "scar",
    "hyperinflate", "blunt", "loss", "widen", "collapse", "density", "emphysema", "aerate", "mass", "crowd",
    "infiltrate", "obscure", "deformity", "hernia", "drainage", "distention", "shift", "stent", "pressure", "lesion",
    "finding", "borderline", "hardware", "dilation", "chf", "redistribution", "aspiration", "tail_abnorm_obs",
    "excluded_obs",
)
ALL = "all"  # ``--labels all``: every entity

# Sample_zero-shot_Classification_CXR14/test.py: the 14 CXR14 classes as MedKLIP names them (fibrosis is
# scored by ``tail_abnorm_obs``, pleural thickening by ``thicken``, infiltration by ``infiltrate``).
CXR14 = ("atelectasis", "cardiomegaly", "effusion", "infiltrate", "mass", "nodule", "pneumonia", "pneumothorax",
         "consolidation", "edema", "emphysema", "tail_abnorm_obs", "thicken", "hernia")
# CheXpert-5 under the labels of our chexpert5 preset, so one CSV evaluates every zero-shot model.
CHEXPERT5 = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "consolidation",
             "Edema": "edema", "Pleural Effusion": "effusion"}
PRESETS: dict[str, dict[str, str]] = {"cxr14": {name: name for name in CXR14}, "chexpert5": CHEXPERT5}
PRESET_TITLES = {"cxr14": "ChestX-ray14 (MedKLIP's mapping)", "chexpert5": "CheXpert-5"}

# Dataset column names -> entities (lower case), so CSVs with CXR14 or CheXpert headers evaluate as is.
ALIASES = {
    "fibrosis": "tail_abnorm_obs", "infiltration": "infiltrate", "pleural_thickening": "thicken",
    "pleural thickening": "thicken", "pleural effusion": "effusion", "no finding": "normal",
    **{label.lower(): entity for label, entity in CHEXPERT5.items()},
}


def entity_for(name: str) -> str | None:
    """The entity a label names (its own name, a dataset alias; any case), or None."""
    key = name.strip().lower()
    if key in ENTITIES:
        return key
    return ALIASES.get(key)
