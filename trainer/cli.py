"""`halflabel-train`: fit a model and publish it, evaluate a published version, or retrain it
from the labels people gave.

Every setting is a flag generated from its model (`trainer.config.TrainConfig` for the recipe,
`trainer.settings` for the rest) and an environment variable; a flag wins over its variable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from models.errors import HalflabelError
from models.repository import Artifact, ModelRepository, parse_reference
from models.settings_cli import with_settings
from trainer.config import TrainConfig
from trainer.errors import DataError
from trainer.settings import RepositorySettings, RetrainSettings

if TYPE_CHECKING:
    from trainer.pipeline import Calibration
    from trainer.retrain import RetrainResult

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
errors = Console(stderr=True)

# What `pip install 'halflabel[trainer]'` brings; an install without it can only say so.
TRAINER_EXTRA = {"torch", "torchvision", "sklearn", "scipy", "faiss", "onnx", "onnxscript",
                 "onnxruntime", "matplotlib", "tqdm"}

DataOption = Annotated[str, typer.Option(
    "--data", help="digits, fashion-mnist, or a folder with labeled/<class>/, unlabeled/, test/")]
DataDirOption = Annotated[Path | None, typer.Option(
    "--data-dir", help="where Fashion-MNIST's *-ubyte.gz files are")]
LabelsPerClassOption = Annotated[int | None, typer.Option(
    min=1, help="label budget per class (default: digits 5, fashion-mnist 10, folders all; "
    "retrain: as given to fit)")]
LabeledFractionOption = Annotated[float | None, typer.Option(
    min=0, max=1, help="label budget as a fraction of each class")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Show our errors as one line and exit non-zero, without a traceback."""
    try:
        yield
    except HalflabelError as exc:
        _fail(str(exc))
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAINER_EXTRA:
            raise
        _fail(f"training needs the trainer extra ({exc.name} is not installed): "
              "pip install 'halflabel[trainer]'")


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _setup_logging() -> None:
    # Libraries' warnings only: they narrate at INFO (the exporter, faiss) and would bury ours.
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=errors, show_path=False, show_time=False)])
    logging.getLogger("trainer").setLevel(logging.INFO)  # the budget's plan, stages rolled back


@app.command()
@with_settings
def fit(
    data: DataOption,
    name: Annotated[str, typer.Option(help="model name in the repository")],
    labels_per_class: LabelsPerClassOption = None,
    labeled_fraction: LabeledFractionOption = None,
    image_size: Annotated[int | None, typer.Option(
        min=8, help="input side in pixels (default: digits 8, fashion-mnist 28; a folder: the "
        "weights' training size, else its images' median shorter side, capped)")
    ] = None,
    if_empty: Annotated[bool, typer.Option(
        "--if-empty", help="train only if the repository has no version of NAME")] = False,
    data_dir: DataDirOption = None,
    *,
    config: TrainConfig,
    settings: RepositorySettings,
) -> None:
    """Train on DATA and publish a new version of NAME."""
    _setup_logging()
    with user_errors():
        repository = ModelRepository(settings.model_dir)
        if if_empty and repository.versions(name):
            console.print(f"model {name!r} already has versions in {repository.root}; "
                          "skipping training (--if-empty)")
            return
        from trainer.data import load_dataset
        from trainer.network import trained_image_size
        from trainer.pipeline import run_pipeline
        from trainer.publish import export_and_publish
        from trainer.runtime import stop_runtime

        dataset = load_dataset(data, labels_per_class=labels_per_class,
                               labeled_fraction=labeled_fraction, seed=config.seed,
                               data_dir=data_dir, image_size=image_size,
                               trained_size=trained_image_size(config.weights),
                               progress=config.progress)
        console.print(f"data {dataset.source}: {len(dataset.labeled)} labeled, "
                      f"{len(dataset.unlabeled)} unlabeled, "
                      f"{len(dataset.test) if dataset.test else 0} test images")
        console.print(f"image size {dataset.spec.height}x{dataset.spec.width} "
                      f"({dataset.size_reason})")
        try:
            trained = run_pipeline(dataset, config)
            if trained.runtime.is_main:
                _print_calibration(trained.calibration)
                _print_published(export_and_publish(trained, repository, name))
        finally:
            stop_runtime()


def _print_calibration(calibration: Calibration) -> None:
    console.print(f"entropy threshold {calibration.entropy_threshold:.3f} queues "
                  f"{calibration.queue_share:.0%} of the {calibration.threshold_from}")
    if calibration.check is not None:
        console.print(calibration.check.describe())


def _print_published(artifact: Artifact) -> None:
    manifest, metrics = artifact.manifest, artifact.manifest.metrics
    console.print(f"published {manifest.name}:{manifest.version} to {artifact.path}")
    ece = f", ECE {metrics.ece:.3f}" if metrics.ece is not None else ""
    console.print(f"{metrics.split}: accuracy {metrics.accuracy:.2%} on {metrics.n_test} images"
                  f"{ece}; entropy threshold {manifest.entropy_threshold:.3f}")


@app.command()
@with_settings
def evaluate(
    name: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default: latest)")],
    data: DataOption,
    data_dir: DataDirOption = None,
    *,
    settings: RepositorySettings,
) -> None:
    """Metrics of a published version on DATA's test split, computed with ONNX Runtime."""
    _setup_logging()
    with user_errors():
        from trainer.data import load_dataset
        from trainer.publish import evaluate_onnx

        model_name, version = parse_reference(name)
        artifact = ModelRepository(settings.model_dir).resolve(model_name, version)
        manifest = artifact.manifest
        dataset = load_dataset(data, spec=manifest.input, data_dir=data_dir,
                               labeled_fraction=1.0, progress=False)
        if dataset.test is None or not len(dataset.test):
            raise DataError(f"{data} has no test split to evaluate on; add DIR/test/<class>/")
        if dataset.classes != manifest.classes:
            raise DataError(f"{data} has classes {', '.join(dataset.classes)} but "
                            f"{name} predicts {', '.join(manifest.classes)}")
        evaluation = evaluate_onnx(artifact, dataset.test.images, dataset.test.labels)
        console.print(f"{manifest.name}:{manifest.version} on {dataset.source}:test "
                      f"({evaluation.n} images): accuracy {evaluation.accuracy:.2%}, "
                      f"ECE {evaluation.ece:.3f}, "
                      f"queued {evaluation.queued_fraction:.1%} at threshold "
                      f"{manifest.entropy_threshold:.3f}")


@app.command()
@with_settings
def retrain(
    name: Annotated[str, typer.Option(help="model to retrain; its latest version is the parent")],
    data: Annotated[str | None, typer.Option(
        help="original data (default: the parent's)")] = None,
    labels_per_class: LabelsPerClassOption = None,
    labeled_fraction: LabeledFractionOption = None,
    *,
    config: TrainConfig,
    settings: RetrainSettings,
) -> None:
    """Fine-tune NAME on the new labels and publish it only if it is not worse. The parent's
    backbone and seed apply unless a flag or variable sets them."""
    _setup_logging()
    with user_errors():
        import redis

        from models.labels import LabelStore
        from trainer import retrain as retraining

        repository = ModelRepository(settings.model_dir)
        parent = repository.resolve(name).manifest
        config = retraining.inherit(config, parent)
        base = retraining.original_data(parent, data=data, labels_per_class=labels_per_class,
                                        labeled_fraction=labeled_fraction, seed=config.seed,
                                        progress=config.progress)
        store = LabelStore(redis.Redis.from_url(settings.redis_url), settings.queue_prefix)
        try:
            result = retraining.retrain(
                name, repository, store, settings.snapshot_dir / settings.queue_prefix, config,
                base, margin=settings.margin, force=settings.force)
        except redis.RedisError as exc:
            raise DataError(f"cannot read labels from Redis at {settings.redis_url}: {exc}; "
                            "check HALFLABEL_REDIS_URL (--redis-url)") from None
    _report_retrain(name, parent.version, result, settings.margin)


def _report_retrain(name: str, parent: int, result: RetrainResult, margin: float) -> None:
    console.print(f"snapshot {result.snapshot.path} ({len(result.snapshot.items)} labels); "
                  f"{result.feedback} used for {name}")
    console.print(f"held-out accuracy: current {name}:{parent} {result.current.accuracy:.2%}, "
                  f"candidate {result.candidate.accuracy:.2%} on {result.candidate.n} images")
    if result.published is None:
        console.print(f"kept {name}:{parent}: the candidate is worse by more than the margin "
                      f"({margin:.2%}); --force publishes anyway")
    else:
        published = result.published
        console.print(f"published {name}:{published.manifest.version} to {published.path}")


def main() -> None:
    """Entry point of `python -m trainer`."""
    app(prog_name="halflabel-train")


if __name__ == "__main__":
    main()
