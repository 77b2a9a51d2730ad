"""The high-resolution plan: which stages a width x height image runs, and at what strength and steps.

No torch here: synth.checks and synth.controlnet plan before anything loads; synth.highres runs the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from synth.config import parse_size
from synth.families import get_family


@dataclass(frozen=True)
class Stage:
    """One step of the chain: the base text-to-image (strength None) or an image-to-image refinement."""

    width: int
    height: int
    strength: float | None
    steps: int


def staged(highres) -> bool:
    return highres is not None and highres.get("name", "none") != "none"


def round_to(value: float, step: int) -> int:
    return max(step, round(value / step) * step)


def plan_stages(highres, family_name: str, native_size: int, width: int, height: int, steps: int) -> list[Stage]:
    """The chain for a width x height image: the base text-to-image stage, then the refinements.

    Up to the native area the chain is the single base stage at the requested size. Above it, the base has
    the native area and the requested aspect, and ceil(log2(scale)) refinements grow it by equal factors
    (each at most 2x) to exactly width x height. Stage strengths come from `highres.strengths[family]`
    (the last repeats); explicit `highres.stages` replace the planned refinements.
    """
    family = get_family(family_name)
    step = family.size_step
    scale = math.sqrt(width * height) / native_size
    if not staged(highres) or (scale <= 1 and not highres.get("stages")):
        return [Stage(width, height, None, steps)]
    base = (round_to(width / max(scale, 1), step), round_to(height / max(scale, 1), step))
    chain = [Stage(*base, None, steps)]
    if highres.get("stages"):
        for spec in highres.stages:
            stage_width, stage_height = parse_size(spec.get("size"), native_size)
            strength = float(spec.get("strength", 0.5))
            chain.append(Stage(stage_width, stage_height, strength, spec.get("steps") or refine_steps(steps, strength)))
        return chain
    count = max(1, math.ceil(math.log2(scale) - 1e-9))
    strengths = list(highres.strengths.get(family_name) or [0.5])
    for index in range(1, count + 1):
        factor = scale ** (index / count) / scale
        size = (width, height) if index == count else (round_to(width * factor, step), round_to(height * factor, step))
        strength = float(strengths[min(index - 1, len(strengths) - 1)])
        stage_steps = highres.get("stage_steps") or refine_steps(steps, strength)
        chain.append(Stage(*size, strength, stage_steps))
    return chain


def refine_steps(steps: int, strength: float) -> int:
    """The run's steps, raised so that floor(steps * strength) >= 1 (a 1-step turbo model still refines)."""
    return max(steps, math.ceil(1 / strength - 1e-9))


def enter_at(plan: list[Stage], image_width: int, image_height: int, strength: float, steps: int):
    """(entry, the plan from there): an init image enters the chain at the largest stage it matches or exceeds,
    refined at the run's denoise_strength and steps."""
    fits = [i for i, stage in enumerate(plan) if stage.width <= image_width and stage.height <= image_height]
    entry = fits[-1] if fits else 0
    plan = plan[entry:]
    plan[0] = Stage(plan[0].width, plan[0].height, strength, steps)
    return entry, plan
