"""The training recipe's settings: one section per method, nested in `TrainConfig`.

Each field is an environment variable `HALFLABEL_TRAIN_<SECTION>_<FIELD>` (top-level ones
`HALFLABEL_TRAIN_<FIELD>`) and a flag `--<section>-<field>` of `fit` and `retrain`, generated
by `models.settings_cli`; a flag wins over its variable. A stage's `steps` is its budget: 0
skips it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The backbones `trainer.network.build_backbone` can build: He et al.'s CIFAR ResNet-20, narrow
# enough for small images on a CPU, and torchvision's ResNets, which have ImageNet weights.
Backbone = Literal["resnet20", "resnet18", "resnet34", "resnet50"]
BackboneChoice = Literal["auto", Backbone]
Device = Literal["auto", "cpu", "cuda"]
SpreadingSpace = Literal["auto", "inputs", "embeddings"]
SpreadingMethod = Literal["auto", "spreading", "poisson"]


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def _seconds(value: object) -> object:
    """'20m', '1h30m', '90s' or '90' as seconds; anything else is left to pydantic to refuse."""
    if not isinstance(value, str):
        return value
    match = _DURATION.fullmatch(value.strip())
    if not value.strip() or match is None:
        raise ValueError(f"{value!r} is not a duration; write e.g. 20m, 1h30m or 90s")
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PretrainConfig(_Section):
    """SimCLR pretraining of the backbone on every training image (only without weights)."""

    steps: int = Field(default=0, ge=0, description="SimCLR steps; used only with --weights none")


class SupervisedConfig(_Section):
    """Fine-tuning on the labeled images alone."""

    steps: int = Field(default=100, ge=0, description="fine-tuning steps on the labeled images")


class SpreadingConfig(_Section):
    """Label spreading over a kNN graph, in rounds, each followed by training on its labels."""

    enabled: bool = Field(
        default=True, description="label spreading and training on its pseudo-labels")
    rounds: int = Field(default=2, ge=1, description="spreading rounds, each on the embeddings the "
                        "previous one improved; the pseudo-label steps are split between them")
    neighbors: int = Field(default=10, ge=1, description="neighbours per image in the kNN graph")
    alpha: float = Field(
        default=0.9, gt=0, lt=1, description="how far labels spread; lower keeps the spread labels "
        "surer near the seeds (0.99 gave flatter, less accurate pseudo-labels on digits)")
    pixel_gamma: float = Field(
        default=30.0, gt=0, description="edge weight exponent over pixels; their cosine "
        "similarities bunch near 1, so the 3 Iscen et al. use for embeddings barely tells "
        "near from far")
    unreached_prior: float = Field(
        default=0.0, ge=0, description="uniform prior, in units of the pool's median label "
        "mass, added before a pseudo-label's confidence is taken: images little label mass "
        "reaches (a class nobody has labelled yet) get flat targets and head the labelling "
        "queue; 0.01 suits a handful of labels that may miss classes, and costs accuracy "
        "once every class has some")
    method: SpreadingMethod = Field(
        default="auto", description="spreading (Zhou et al.) or poisson (Calder et al.); auto: "
        "poisson when the classes have fewer than two labels each to train on, where it wins "
        "(docs/training.md)")
    first_space: SpreadingSpace = Field(
        default="auto", description="what the first round spreads over; auto: the pixels of small "
        "images when the backbone starts untrained, else the backbone's embeddings")


class PseudoConfig(_Section):
    """Training on labeled images plus the spread pseudo-labels."""

    steps: int = Field(default=80, ge=0, description="training steps on the spread pseudo-labels, "
                       "over all spreading rounds")


class RefineConfig(_Section):
    """FixMatch consistency training with FlexMatch class thresholds."""

    steps: int = Field(default=40, ge=0, description="FixMatch + FlexMatch refinement steps")
    confidence_threshold: float = Field(default=0.95, gt=0, lt=1, description="FixMatch's tau")


class CalibrationConfig(_Section):
    """Temperature scaling on a held-out slice of the labels, and the entropy threshold."""

    fraction: float = Field(
        default=0.2, ge=0, lt=1, description="share of each class's labels held out for "
        "temperature scaling and the threshold's check (rounded down, leaving at least two)")
    queue_share: float = Field(
        default=0.1, gt=0, lt=1, description="share of inputs the service should queue for "
        "labelling: the entropy threshold is the unlabeled pool's (1 - share) quantile")


class TrainConfig(BaseSettings):
    """Every knob of the pipeline: shared ones at the top, each method's in its section."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_TRAIN_", env_nested_delimiter="_",
                                      env_nested_max_split=1, frozen=True, extra="forbid")

    backbone: BackboneChoice = Field(
        "auto", description="the network's ResNet; auto: resnet20 for small images trained "
        "from scratch on a CPU, the weights' own with a checkpoint, else resnet18")
    weights: str = Field("none", description="imagenet, a checkpoint PATH, or none")
    device: Device = Field("auto", description="auto uses CUDA when PyTorch sees a GPU")
    seed: int = Field(0, description="seed for the label split and training")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores")
    batch_size: int = Field(64, ge=2, description="labeled images per batch")
    learning_rate: float = Field(0.05, gt=0, description="SGD's, cosine-annealed in each stage")
    unlabeled_ratio: int = Field(2, ge=1, description="unlabeled per labeled image in a batch")
    horizontal_flip: bool = Field(False, description="flip augmentation, for classes a mirror "
                                  "does not change (off for digits)")
    fp16: bool = Field(False, description="also publish an FP16 ONNX")
    progress: bool = Field(True, description="progress bars")
    budget: Seconds | None = Field(
        None, description="wall time for the stages, e.g. 20m or 1h: their steps are scaled to "
        "fill it, measured on this machine, and the plan printed before training")
    rollback: bool = Field(True, description="undo a stage that lowers the held-out criterion "
                           "(held-out labels + the latest spreading round's surest pseudo-labels)")
    pretrain: PretrainConfig = PretrainConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    spreading: SpreadingConfig = SpreadingConfig()
    pseudo: PseudoConfig = PseudoConfig()
    refine: RefineConfig = RefineConfig()
    calibration: CalibrationConfig = CalibrationConfig()
