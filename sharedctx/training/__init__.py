"""Training and evaluating adapters: the trainer and its recipes (`trainer`), corpora and task examples
(`data`), and perplexity / passkey evaluation with controls (`evaluate`)."""

from __future__ import annotations

from .trainer import TrainConfig, Trainer, load_recipe

__all__ = ["TrainConfig", "Trainer", "load_recipe"]
