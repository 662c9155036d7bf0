"""FT-M (EasyEdit): full fine-tuning of one MLP projection of one layer, loss on the target
tokens under teacher forcing. A preset of `full_sft` with its own defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from .full_sft import Config as FullConfig
from .full_sft import kind, train  # noqa: F401 - the method trains as full SFT does

NAME = "ft-m"


@dataclass
class Config(FullConfig):
    """FT-M settings: full SFT restricted to one layer's MLP output projection."""

    modules: list[str] = field(default_factory=lambda: ["mlp_out"])
    layers: str = "3"
    lr: float = 5e-4
