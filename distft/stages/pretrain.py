"""Continued pretraining / full fine-tuning on plain text.

The loop is the SFT stage's: the schema gives `pretrain` text-format data and
loss on every token by default, which is all that differs.
"""

from distft.stages.sft import run

__all__ = ["run"]
