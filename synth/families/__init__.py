"""The model families synth runs, one adapter module each (see base.py for what a family declares).

A new family is one module here, registered below, plus its config file in conf/model/ (and a tiny_* twin
config); a variant of a family (SDXL-Turbo, SD3.5) is a config file alone.
"""

from __future__ import annotations

from synth.families.base import FLOW, NOISE, Family
from synth.families.flux import Flux
from synth.families.hunyuan_dit import HunyuanDiT
from synth.families.kolors import Kolors
from synth.families.sd3 import SD3
from synth.families.sd15 import SD15
from synth.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {family.name: family for family in (SD15(), SDXL(), SD3(), Kolors(), HunyuanDiT(), Flux())}

__all__ = ["FAMILIES", "FLOW", "NOISE", "Family", "get_family"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]
