"""The former home of `validate` (now mdt_jax/training/run.py), kept for the tools that still
import it from here."""

from mdt_jax.training.run import validate

__all__ = ['validate']
