"""The objective registry: ``[stage] objective = NAME`` → the class that supplies it to the loop."""

from __future__ import annotations

from training.controlnet import ControlNetObjective
from training.distill import LcmObjective
from training.dreambooth import DreamBoothObjective
from training.objective import Objective

OBJECTIVES: dict[str, type[Objective]] = {
    "diffusion": Objective,
    "lcm": LcmObjective,
    "controlnet": ControlNetObjective,
    "dreambooth": DreamBoothObjective,
}
