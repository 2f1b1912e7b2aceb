"""A compute budget (`--budget 20m`) turned into the stages' steps before training starts.

Each stage that will run is timed for a few steps on a throwaway copy of the training state,
which gives its cost per step and its fixed cost. A spreading round reports its fixed work (the
graph and solve over the whole pool, `SETUP_SECONDS` in what it returns) itself: it is large
and varies by more from run to run than a few steps cost, so a difference of two timed runs
would drown the steps in it (planned 827 s for a round that takes about 60, on Fashion-MNIST).
Every stage's steps are then scaled by one factor, keeping the recipe's proportions, so that
the stages fill the budget less a reserve for calibration, export and the report. The
smallest budget that works is the one the recipe's own step counts need: below it the
factor would shrink stages the defaults already keep short, and that is refused.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace

from trainer.config import TrainConfig
from trainer.errors import SettingsError
from trainer.stage import SETUP_SECONDS, Stage, TrainingState

log = logging.getLogger(__name__)

PROBE_STEPS = (1, 5)
RESERVE = 0.1  # of the budget, for calibration, export, parity check and report
STEP_SECTIONS = ("pretrain", "supervised", "pseudo", "refine")


@dataclass(frozen=True)
class StageCost:
    name: str
    per_step: float
    fixed: float


@dataclass(frozen=True)
class Plan:
    """The config with its steps scaled to the budget, and what each stage should take."""

    config: TrainConfig
    costs: tuple[StageCost, ...]
    stages: tuple[Stage, ...]

    def seconds(self) -> float:
        return sum(seconds for _, _, seconds in self._rows())

    def describe(self) -> str:
        return ", ".join(f"{name} {steps} steps (~{seconds:.0f} s)"
                         for name, steps, seconds in self._rows())

    def _rows(self) -> list[tuple[str, int, float]]:
        return [(stage.name, steps := stage.steps(self.config), cost.fixed + cost.per_step * steps)
                for cost, stage in zip(self.costs, self.stages, strict=True)]


def plan(stages: list[Stage], state: TrainingState, budget: float) -> Plan:
    """Scale `state.config`'s steps so that `stages` fill `budget` seconds."""
    running = tuple(stage for stage in stages if stage.steps(state.config))
    started = time.perf_counter()
    costs = tuple(_measure(stage, state) for stage in running)
    probing = time.perf_counter() - started
    at_defaults = Plan(state.config, costs, running)
    available = budget * (1 - RESERVE) - probing
    fixed = sum(cost.fixed for cost in costs)
    variable = at_defaults.seconds() - fixed
    if available < at_defaults.seconds():
        smallest = math.ceil((at_defaults.seconds() + probing) / (1 - RESERVE))
        raise SettingsError(
            f"--budget {budget:.0f}s is too small for the planned stages "
            f"({at_defaults.describe()}); the smallest budget that works on this machine is "
            f"{smallest}s, or give no budget")
    planned = Plan(scale_steps(state.config, (available - fixed) / variable), costs, running)
    log.info("budget %.0fs: %s; measured in %.0f s", budget, planned.describe(), probing)
    return planned


def scale_steps(config: TrainConfig, factor: float) -> TrainConfig:
    """Every stage's steps times `factor`; a stage that is off stays off."""
    update = {name: getattr(config, name).model_copy(
        update={"steps": round(getattr(config, name).steps * factor)}) for name in STEP_SECTIONS}
    return config.model_copy(update=update)


def _measure(stage: Stage, state: TrainingState) -> StageCost:
    """Seconds per step and fixed seconds of `stage`: from one run of the larger number of
    `PROBE_STEPS` and the fixed work it reports, or from the difference of runs of both."""
    few, many = PROBE_STEPS
    # The larger run first: the process's one-time warm-up then inflates the per-step cost
    # (a plan that ends early) rather than hiding it (one that overruns).
    seconds, details = _timed(stage, state, many)
    if SETUP_SECONDS in details:
        fixed = details[SETUP_SECONDS]
        per_step = (seconds - fixed) / many
    else:
        per_step = (seconds - _timed(stage, state, few)[0]) / (many - few)
        fixed = seconds - per_step * many
    return StageCost(stage.name, max(per_step, 1e-6), max(fixed, 0.0))


def _timed(stage: Stage, state: TrainingState, steps: int) -> tuple[float, dict[str, float]]:
    """Seconds `stage` takes for `steps` on a throwaway copy of `state`, and what it reports."""
    probe = replace(state, classifier=copy.deepcopy(state.classifier),
                    runtime=replace(state.runtime, progress=False))
    started = time.perf_counter()
    details = stage.run(probe, steps)
    return time.perf_counter() - started, details
