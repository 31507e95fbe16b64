"""Zero-shot classification: the classifier, one module per model (MedCLIP, BiomedCLIP) and the prompt sets."""

from .classifier import ZeroShotClassifier, ZeroShotResult, available_models

__all__ = ["ZeroShotClassifier", "ZeroShotResult", "available_models"]
