"""Training configuration: `HALFLABEL_TRAIN_*` environment variables, overridden by CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Backbone = Literal["resnet18", "resnet34", "resnet50"]
Device = Literal["auto", "cpu", "cuda"]
SpreadingSpace = Literal["auto", "inputs", "embeddings"]


class TrainConfig(BaseSettings):
    """Every knob of the pipeline; each stage can be switched off by setting its budget to 0."""

    model_config = SettingsConfigDict(env_prefix="HALFLABEL_TRAIN_", frozen=True)

    backbone: Backbone = "resnet18"
    weights: str = Field("none", description="imagenet, a checkpoint PATH, or none")
    device: Device = "auto"
    seed: int = 0
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores")
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(0.05, gt=0)
    pretrain_steps: int = Field(0, ge=0, description="SimCLR steps; used only without weights")
    supervised_steps: int = Field(100, ge=0)
    spreading: bool = True
    spreading_neighbors: int = Field(10, ge=1)
    spreading_alpha: float = Field(
        0.9, gt=0, lt=1, description="how far labels spread; lower keeps the spread labels "
        "surer near the seeds (0.99 gave flatter, less accurate pseudo-labels on digits)")
    pixel_spreading_gamma: float = Field(
        30.0, gt=0, description="edge weight exponent over pixels; their cosine similarities "
        "bunch near 1, so the 3 Iscen et al. use for embeddings barely tells near from far")
    unreached_prior: float = Field(
        0.0, ge=0, description="uniform prior, in units of the pool's median label mass, added "
        "before a pseudo-label's confidence is taken: images little label mass reaches (a class "
        "nobody has labelled yet) get flat targets and head the labelling queue; 0.01 suits a "
        "handful of labels that may miss classes, and costs accuracy once every class has some")
    spreading_rounds: int = Field(2, ge=1, description="re-spread on the improved embeddings")
    first_spreading_space: SpreadingSpace = Field(
        "auto", description="what the first round spreads over; auto: the pixels of small "
        "images when the backbone starts untrained, else the backbone's embeddings")
    pseudo_steps: int = Field(80, ge=0, description="training on the spread pseudo-labels")
    refine_steps: int = Field(40, ge=0, description="FixMatch + FlexMatch refinement steps")
    confidence_threshold: float = Field(0.95, gt=0, lt=1, description="FixMatch's tau")
    unlabeled_ratio: int = Field(2, ge=1, description="unlabeled per labeled image in a batch")
    calibration_fraction: float = Field(0.2, ge=0, lt=1)
    target_confident_accuracy: float = Field(0.95, gt=0, le=1)
    min_queue_fraction: float = Field(0.1, ge=0, le=1)
    fp16: bool = False
    horizontal_flip: bool = Field(False, description="flip augmentation (off for digits)")
    progress: bool = True
