"""The plan of a run, computed from the config before anything runs: which stages run, on
which endpoint and model each, and so which servers the run needs.

Everything that decides what work a run does asks the plan, so that what a user
configures is what runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from tagcaption.config import Config
from tagcaption.vocabulary import STAGES


@dataclass(frozen=True)
class Step:
    stage: str
    endpoint: str
    model: str


@dataclass(frozen=True)
class RunPlan:
    steps: Tuple[Step, ...]
    """The stages that run, in pipeline order."""

    def runs(self, stage: str) -> bool:
        return any(step.stage == stage for step in self.steps)

    @property
    def endpoints(self) -> Dict[str, Tuple[str, ...]]:
        """Each endpoint the run uses, with the models asked there."""
        used: Dict[str, Tuple[str, ...]] = {}
        for step in self.steps:
            models = used.get(step.endpoint, ())
            used[step.endpoint] = models if step.model in models else models + (step.model,)
        return used

    def describe(self) -> List[str]:
        """A line per stage, for `check` and `--dry-run`."""
        return [f"{step.stage}: {step.model} via {step.endpoint}" for step in self.steps]


def plan_run(config: Config) -> RunPlan:
    return RunPlan(tuple(Step(stage, getattr(config, stage).endpoint, getattr(config, stage).model)
                         for stage in STAGES if not getattr(config, stage).skip))
