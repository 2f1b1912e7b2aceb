"""`halflabel-train` end to end: a tiny digits fit publishes a model ONNX Runtime can serve."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import typer
from typer.testing import CliRunner

from models.repository import ModelRepository
from models.settings_cli import env_name, flag_name, settings_fields, with_settings
from trainer.cli import app
from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.network import ProbabilitiesAndEntropy, classifier_from_checkpoint
from trainer.settings import RepositorySettings, RetrainSettings

TINY_BUDGET = ["--supervised-steps", "4", "--pseudo-steps", "4", "--refine-steps", "2",
               "--threads", "1", "--no-progress", "--batch-size", "16"]


def train_cli(*args: str, model_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HALFLABEL_MODEL_DIR": str(model_dir)}
    return subprocess.run([sys.executable, "-m", "trainer", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("error:"), result.stderr
    for word in words:
        assert word in message


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository where a tiny digits fit has published `digits` version 1."""
    root = tmp_path_factory.mktemp("trainer") / "store"
    result = train_cli("fit", "--data", "digits", "--name", "digits", *TINY_BUDGET,
                       model_dir=root)
    assert result.returncode == 0, result.stderr
    assert f"published digits:1 to {root / 'digits' / '1'}" in result.stdout
    assert "image size 8x8 (the set's native size)" in result.stdout
    assert "digits:test: accuracy" in result.stdout
    assert "queues 10% of the pool" in result.stdout and "held-out check:" in result.stdout
    return root


@pytest.mark.slow
def test_fit_publishes_a_complete_artifact(store: Path) -> None:
    artifact = ModelRepository(store).resolve("digits")
    manifest = artifact.manifest
    assert manifest.classes == tuple("0123456789")
    assert (manifest.input.height, manifest.input.width, manifest.input.channels) == (8, 8, 1)
    assert manifest.metrics.split == "digits:test" and manifest.metrics.n_test == 450
    assert manifest.training.labelled == 50 and manifest.training.pseudo_labelled > 1000
    assert manifest.training.backbone == "resnet20"  # what `auto` built for 8x8 on a CPU
    assert manifest.training.stages == ("supervised", "label-spreading-1", "label-spreading-2",
                                        "fixmatch")
    assert 0 <= manifest.entropy_threshold <= 1
    assert manifest.queue_share == TrainConfig().calibration.queue_share
    for extra in ("report.json", "weights.pt", "confusion_matrix.png", "reliability.png",
                  "accuracy_by_stage.png"):
        assert (artifact.path / extra).stat().st_size > 0, extra


@pytest.mark.slow
def test_published_onnx_serves_any_batch_with_probabilities_and_entropy(store: Path) -> None:
    artifact = ModelRepository(store).resolve("digits")
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "entropy"]
    test = load_dataset("digits", spec=artifact.manifest.input, progress=False).test
    assert test is not None
    for batch in (1, 7):
        probabilities, entropy = session.run(None, {"image": test.images[:batch]})
        assert probabilities.shape == (batch, 10) and entropy.shape == (batch,)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
        expected = -(probabilities * np.log(np.clip(probabilities, 1e-30, 1))).sum(axis=1)
        np.testing.assert_allclose(entropy, expected, atol=1e-4)
        assert np.all(entropy <= math.log(10) + 1e-5)


@pytest.mark.slow
def test_weights_rebuild_the_published_model(store: Path) -> None:
    artifact = ModelRepository(store).resolve("digits")
    classifier = classifier_from_checkpoint(artifact.path / "weights.pt").eval()
    test = load_dataset("digits", progress=False).test
    assert test is not None
    images = test.images[:16]
    with torch.no_grad():
        torch_probabilities, _ = ProbabilitiesAndEntropy(classifier)(torch.as_tensor(images))
    session = ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    onnx_probabilities = session.run(["probabilities"], {"image": images})[0]
    np.testing.assert_allclose(onnx_probabilities, torch_probabilities.numpy(), atol=1e-4)


@pytest.mark.slow
def test_evaluate_recomputes_the_manifest_accuracy_with_onnx_runtime(store: Path) -> None:
    result = train_cli("evaluate", "--name", "digits:1", "--data", "digits", model_dir=store)
    assert result.returncode == 0, result.stderr
    accuracy = ModelRepository(store).resolve("digits").manifest.metrics.accuracy
    assert f"accuracy {accuracy:.2%}" in result.stdout


@pytest.mark.slow
def test_if_empty_skips_when_a_version_exists(store: Path) -> None:
    result = train_cli("fit", "--data", "digits", "--name", "digits", "--if-empty",
                       model_dir=store)
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stdout
    assert ModelRepository(store).versions("digits") == [1]


def test_console_script_and_module_are_the_same_program() -> None:
    script = Path(sys.executable).with_name("halflabel-train")
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    via_module = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True,
                                text=True)
    assert via_script.returncode == via_module.returncode == 0
    assert via_script.stdout == via_module.stdout
    assert "fit" in via_script.stdout and "evaluate" in via_script.stdout


def test_unknown_model_is_one_line(tmp_path: Path) -> None:
    result = train_cli("evaluate", "--name", "nope", "--data", "digits",
                       model_dir=tmp_path / "store")
    assert_one_line_error(result, "nope")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    result = train_cli("fit", "--data", "fashion-mnist", "--data-dir", str(tmp_path),
                       "--name", "f", model_dir=tmp_path / "store")
    assert_one_line_error(result, "dataset-fashion-mnist", "--data-dir")


def test_label_budget_beyond_the_data_names_the_class(tmp_path: Path) -> None:
    result = train_cli("fit", "--data", "digits", "--name", "d", "--labels-per-class", "1000",
                       model_dir=tmp_path / "store")
    assert_one_line_error(result, "class '0'", "1000")
    assert not (tmp_path / "store").exists() or not ModelRepository(tmp_path / "store").names()


def test_unknown_data_source_is_one_line(tmp_path: Path) -> None:
    result = train_cli("fit", "--data", str(tmp_path / "missing"), "--name", "d",
                       model_dir=tmp_path / "store")
    assert_one_line_error(result, "missing", "digits")


def test_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = train_cli("fit", "--data", "digits", "--name", "d", "--device", "cuda",
                       *TINY_BUDGET, model_dir=tmp_path / "store")
    assert_one_line_error(result, "--device cuda")


@pytest.mark.parametrize(("command", "models"), [
    ("fit", (TrainConfig, RepositorySettings)),
    ("evaluate", (RepositorySettings,)),
    ("retrain", (TrainConfig, RetrainSettings)),
])
def test_help_lists_every_setting_with_its_variable(
    command: str, models: tuple[type, ...]
) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"},
                                prog_name="halflabel-train")
    assert result.exit_code == 0, result.output
    for model in models:
        for path, _ in settings_fields(model):
            assert f"{flag_name(path)} " in result.output, (command, path)
            assert env_name(model, path) in result.output, (command, path)
    assert env_name(TrainConfig, ("spreading", "alpha")) == "HALFLABEL_TRAIN_SPREADING_ALPHA"


def show_config(config: TrainConfig) -> None:
    print(config.model_dump_json())


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    probe = typer.Typer()
    probe.command()(with_settings(show_config))
    runner = CliRunner()
    env = {"HALFLABEL_TRAIN_SPREADING_ALPHA": "0.5", "HALFLABEL_TRAIN_PSEUDO_STEPS": "7",
           "HALFLABEL_TRAIN_BATCH_SIZE": "9"}
    result = runner.invoke(probe, ["--pseudo-steps", "3", "--no-spreading", "--seed", "4"],
                           env=env)
    assert result.exit_code == 0, result.output
    config = TrainConfig.model_validate_json(result.output)
    assert (config.pseudo.steps, config.spreading.enabled, config.seed) == (3, False, 4)
    assert (config.spreading.alpha, config.batch_size) == (0.5, 9)
    assert config.spreading.rounds == TrainConfig().spreading.rounds
    bad = runner.invoke(probe, [], env={"HALFLABEL_TRAIN_SPREADING_ALPHA": "2"})
    assert bad.exit_code == 2
    message = " ".join(bad.output.replace("│", " ").split())
    assert "--spreading-alpha" in message and "HALFLABEL_TRAIN_SPREADING_ALPHA" in message


@pytest.mark.parametrize("share", ["0", "1", "-0.1", "1.5"])
def test_a_queue_share_outside_0_to_1_is_refused_naming_flag_and_variable(share: str) -> None:
    probe = typer.Typer()
    probe.command()(with_settings(show_config))
    bad = CliRunner().invoke(probe, ["--calibration-queue-share", share])
    assert bad.exit_code == 2
    message = " ".join(bad.output.replace("│", " ").split())
    assert "--calibration-queue-share" in message
    assert "HALFLABEL_TRAIN_CALIBRATION_QUEUE_SHARE" in message


def test_retrain_gate_settings_keep_their_names() -> None:
    settings = RetrainSettings(margin=0.1)  # a flag's value, by field name
    assert settings.margin == 0.1
    assert env_name(RetrainSettings, ("margin",)) == "HALFLABEL_RETRAIN_MARGIN"
    os.environ["HALFLABEL_RETRAIN_MARGIN"] = "0.25"
    try:
        assert RetrainSettings().margin == 0.25
    finally:
        del os.environ["HALFLABEL_RETRAIN_MARGIN"]


NO_TORCH = """
import sys

class NoTorch:  # as on an install without the trainer extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
from trainer.cli import main
sys.argv[0] = "halflabel-train"
main()
"""


@pytest.mark.parametrize("command", [
    ["fit", "--data", "digits", "--name", "d"],
    ["evaluate", "--data", "digits", "--name", "d"],
    ["retrain", "--name", "d"],
])
def test_without_the_trainer_extra_a_command_names_it(command: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", NO_TORCH, *command,
                             "--model-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert_one_line_error(result, "pip install 'halflabel[trainer]'", "torch")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    help_text = subprocess.run([sys.executable, "-c", NO_TORCH, command[0], "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "--model-dir" in help_text.stdout
