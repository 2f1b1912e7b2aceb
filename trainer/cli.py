"""`halflabel-train`: fit a model and publish it, or evaluate a published version."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from models.errors import HalflabelError
from models.repository import ModelRepository, default_root, parse_reference
from trainer.config import Backbone, Device, SpreadingSpace, TrainConfig
from trainer.retrain import retrain_command

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
console = Console()
errors = Console(stderr=True)

DataOption = Annotated[str, typer.Option(
    "--data", help="digits, fashion-mnist, or a folder with labeled/<class>/, unlabeled/, test/")]
ModelDirOption = Annotated[Path | None, typer.Option(
    "--model-dir", envvar="HALFLABEL_MODEL_DIR", show_envvar=True,
    help="model repository root [default: models/store]")]
DataDirOption = Annotated[Path | None, typer.Option(
    "--data-dir", help="where Fashion-MNIST's *-ubyte.gz files are")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Show our errors as one line and exit non-zero, without a traceback."""
    try:
        yield
    except HalflabelError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _setup_logging() -> None:
    # Warnings only: libraries narrate at INFO (the exporter, faiss) and would bury our output.
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=errors, show_path=False, show_time=False)])


@app.command()
def fit(
    data: DataOption,
    name: Annotated[str, typer.Option(help="model name in the repository")],
    labels_per_class: Annotated[int | None, typer.Option(
        min=1, help="label budget per class [default: digits 5, fashion-mnist 10, folders all]")
    ] = None,
    labeled_fraction: Annotated[float | None, typer.Option(
        min=0, max=1, help="label budget as a fraction of each class")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for the split and training")] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="resnet18, resnet34 or resnet50")
                        ] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet, a checkpoint PATH, or none")
                       ] = None,
    device: Annotated[Device | None, typer.Option(help="auto, cpu or cuda")] = None,
    image_size: Annotated[int | None, typer.Option(
        min=8, help="input side in pixels [default: digits 8, fashion-mnist 28, folders 32]")
    ] = None,
    pretrain_steps: Annotated[int | None, typer.Option(
        min=0, help="SimCLR pretraining steps (without weights)")] = None,
    supervised_steps: Annotated[int | None, typer.Option(min=0)] = None,
    pseudo_steps: Annotated[int | None, typer.Option(
        min=0, help="training steps on the spread pseudo-labels")] = None,
    spreading_rounds: Annotated[int | None, typer.Option(
        min=1, help="label spreading rounds, each on the embeddings the last one improved")
    ] = None,
    first_spreading_space: Annotated[SpreadingSpace | None, typer.Option(
        help="first spreading round over inputs (pixels) or embeddings; auto: pixels of small "
        "images when the backbone starts untrained")] = None,
    refine_steps: Annotated[int | None, typer.Option(
        min=0, help="FixMatch/FlexMatch refinement steps")] = None,
    spreading: Annotated[bool | None, typer.Option(
        "--spreading/--no-spreading", help="label spreading stage")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2)] = None,
    horizontal_flip: Annotated[bool | None, typer.Option(
        "--horizontal-flip/--no-horizontal-flip",
        help="flip augmentation, for classes a mirror does not change [default: off]")] = None,
    fp16: Annotated[bool | None, typer.Option("--fp16/--no-fp16",
                                              help="also publish an FP16 ONNX")] = None,
    threads: Annotated[int | None, typer.Option(min=0, help="CPU threads (0: all)")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,
    if_empty: Annotated[bool, typer.Option(
        "--if-empty", help="train only if the repository has no version of NAME")] = False,
    model_dir: ModelDirOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Train on DATA and publish a new version of NAME. Flags override HALFLABEL_TRAIN_* vars."""
    _setup_logging()
    # Flags left unset fall through to HALFLABEL_TRAIN_* variables, then to the defaults.
    flags = {key: value for key, value in locals().items()
             if key in TrainConfig.model_fields and value is not None}
    with user_errors():
        repository = ModelRepository(model_dir or default_root())
        if if_empty and repository.versions(name):
            console.print(f"model {name!r} already has versions in {repository.root}; "
                          "skipping training (--if-empty)")
            return
        _fit(TrainConfig(**flags), data, name, repository, labels_per_class,
             labeled_fraction, data_dir, image_size)


def _fit(config: TrainConfig, data: str, name: str, repository: ModelRepository,
         labels_per_class: int | None, labeled_fraction: float | None,
         data_dir: Path | None, image_size: int | None) -> None:
    from trainer.data import load_dataset
    from trainer.pipeline import run_pipeline
    from trainer.publish import export_and_publish
    from trainer.runtime import stop_runtime

    dataset = load_dataset(data, labels_per_class=labels_per_class,
                           labeled_fraction=labeled_fraction, seed=config.seed,
                           data_dir=data_dir, image_size=image_size, progress=config.progress)
    console.print(f"data {dataset.source}: {len(dataset.labeled)} labeled, "
                  f"{len(dataset.unlabeled)} unlabeled, "
                  f"{len(dataset.test) if dataset.test else 0} test images")
    try:
        trained = run_pipeline(dataset, config)
        if trained.runtime.is_main:
            artifact = export_and_publish(trained, repository, name)
            _print_published(artifact.path, artifact.manifest.model_dump())
    finally:
        stop_runtime()


def _print_published(path: Path, manifest: dict[str, Any]) -> None:
    metrics = manifest["metrics"]
    console.print(f"published {manifest['name']}:{manifest['version']} to {path}")
    ece = f", ECE {metrics['ece']:.3f}" if metrics["ece"] is not None else ""
    console.print(f"{metrics['split']}: accuracy {metrics['accuracy']:.2%} "
                  f"on {metrics['n_test']} images{ece}; "
                  f"entropy threshold {manifest['entropy_threshold']:.3f}")


@app.command()
def evaluate(
    name: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default: latest)")],
    data: DataOption,
    model_dir: ModelDirOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Metrics of a published version on DATA's test split, computed with ONNX Runtime."""
    _setup_logging()
    with user_errors():
        from trainer.data import load_dataset
        from trainer.errors import DataError
        from trainer.publish import evaluate_onnx

        model_name, version = parse_reference(name)
        artifact = ModelRepository(model_dir or default_root()).resolve(model_name, version)
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


app.command("retrain")(retrain_command)


def main() -> None:
    """Entry point of `python -m trainer`."""
    app(prog_name="halflabel-train")


if __name__ == "__main__":
    main()
