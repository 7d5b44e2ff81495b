"""Using a trained checkpoint: ``load`` (model and tokenizer in two lines), ``nam-train eval`` and
``nam-train generate``."""

from nam_trainer.use.loader import Loaded, load

__all__ = ["Loaded", "load"]
