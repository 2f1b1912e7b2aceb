"""`--budget`: a wall time turned into stage steps, refused when too small to run the recipe."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from trainer import budget
from trainer.budget import StageCost, plan
from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.errors import SettingsError
from trainer.pipeline import recipe, run_pipeline
from trainer.stage import SETUP_SECONDS


@pytest.mark.parametrize(("text", "seconds"), [("20m", 1200), ("1h30m", 5400), ("90s", 90),
                                                 ("45", 45), ("1.5h", 5400), (600, 600)])
def test_budget_reads_durations(text: str | int, seconds: float) -> None:
    assert TrainConfig(budget=text).budget == seconds


@pytest.mark.parametrize("text", ["2x", "m", "", "-5m", "0"])
def test_a_budget_that_is_no_duration_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="budget"):
        TrainConfig(budget=text)


def test_steps_are_scaled_to_fill_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {"supervised": (0.01, 0.0), "label-spreading-1": (0.02, 1.0),
             "label-spreading-2": (0.02, 1.0), "fixmatch": (0.04, 0.0)}
    monkeypatch.setattr(budget, "_measure", lambda stage, state: StageCost(
        stage.name, *costs[stage.name]))
    config = TrainConfig()
    planned = plan(recipe(config), SimpleNamespace(config=config), 600)  # type: ignore[arg-type]
    assert planned.seconds() == pytest.approx(600 * (1 - budget.RESERVE), rel=0.01)
    factor = planned.config.supervised.steps / config.supervised.steps
    assert factor > 10
    for section in ("pseudo", "refine"):  # the recipe's proportions kept
        assert getattr(planned.config, section).steps == pytest.approx(
            getattr(config, section).steps * factor, rel=0.02)
    assert planned.config.pretrain.steps == 0  # a stage that was off stays off


def test_a_budget_too_small_names_the_smallest_that_works() -> None:
    digits = load_dataset("digits", labels_per_class=5, progress=False)
    config = TrainConfig(threads=1, progress=False, batch_size=8, budget=0.5,
                         supervised={"steps": 3}, pseudo={"steps": 3}, refine={"steps": 2})
    with pytest.raises(SettingsError, match=r"smallest budget that works on this machine is \d+s"):
        run_pipeline(digits, config)


@dataclass
class FakeRuntime:
    progress: bool


@dataclass
class FakeState:
    classifier: None
    runtime: FakeRuntime


class SleepyStage:
    """Sleeps `fixed` (plus `jitter` on its first run) and `per_step` per step."""

    name = "sleepy"

    def __init__(self, fixed: float, per_step: float, reports_setup: bool,
                 jitter: float) -> None:
        self.fixed, self.per_step, self.reports_setup = fixed, per_step, reports_setup
        self.jitter = jitter

    def run(self, state: object, steps: int) -> dict[str, float]:
        setup = self.fixed + self.jitter
        self.jitter = 0.0
        time.sleep(setup + self.per_step * steps)
        return {SETUP_SECONDS: setup} if self.reports_setup else {}


@pytest.mark.parametrize("reports_setup", [True, False])
def test_a_stage_is_timed_per_step_and_fixed(reports_setup: bool) -> None:
    # Fixed work that varies by more than the probe's steps cost (a spreading round's graph)
    # is told apart only by the stage's own report; without one, the per-step cost comes out
    # of the difference, high rather than low.
    stage = SleepyStage(fixed=0.2, per_step=0.01, reports_setup=reports_setup, jitter=0.1)
    state = FakeState(classifier=None, runtime=FakeRuntime(progress=False))
    cost = budget._measure(stage, state)  # type: ignore[arg-type]
    if reports_setup:
        assert cost.per_step == pytest.approx(0.01, abs=0.004)
        assert cost.fixed == pytest.approx(0.3, abs=0.02)
    else:
        assert cost.per_step > 0.01
