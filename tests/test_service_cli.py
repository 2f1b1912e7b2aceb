"""`halflabel-serve` and `python -m service`: one command, flags over env, one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.repository import ModelRepository
from service.settings import Settings

SERVE = Path(sys.executable).parent / "halflabel-serve"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)


def test_console_script_and_module_are_the_same_command() -> None:
    script = run([str(SERVE), "--help"], {"COLUMNS": "120"})
    module = run([sys.executable, "-m", "service", "--help"], {"COLUMNS": "120"})
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout
    assert "--max-queue-delay-ms" in script.stdout and "--allow-open" in script.stdout


def test_help_lists_every_setting_with_its_description_default_and_variable() -> None:
    output = run([str(SERVE), "--help"], {"COLUMNS": "200"}).stdout
    help_text = " ".join(output.replace("│", " ").split())  # the table's rows, wrapped lines joined
    options = help_text[help_text.index("Options"):]
    for name, field in Settings.model_fields.items():
        entry = re.search(rf" --{name.replace('_', '-')} .*?(?= --(?!no-)[a-z]|$)", options)
        assert entry is not None, f"{name} has no flag"
        assert field.description and field.description in entry.group(), name
        if field.default_factory is None:
            default = f"(default: {field.default}; env HALFLABEL_{name.upper()})"
            assert default in entry.group(), name


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model-name", "nope"], "error: no model named 'nope'"),
        (["--model-version", "9"], "error: model 'tiny' has no version 9"),
        # With workers, what every worker would fail on is checked once, before they start.
        (["--workers", "2", "--model-name", "nope"], "error: no model named 'nope'"),
        (["--workers", "0"], "error: Invalid value for '--workers'"),
        (["--max-batch-size", "0"],
         "error: Invalid value for '--max-batch-size': Input should be greater than or equal to 1 "
         "(from the flag or HALFLABEL_MAX_BATCH_SIZE)"),
        (["--header-timeout-s", "-1"], "error: Invalid value for '--header-timeout-s'"),
        (["--log-level", "loud"], "error: Invalid value for '--log-level'"),
        (["--max-connections", "100000000"], "error: 100000000 connections need 100000256"),
        (["--no-such-flag"], "error: No such option: --no-such-flag; see halflabel-serve --help"),
        (["--api-keys", "k:nosuchscope"], "error: Invalid value for '--api-keys': bad API key"),
        # Beyond loopback the service needs API keys or --allow-open; with either it gets as far
        # as loading the model.
        (["--host", "0.0.0.0"], "error: refusing to listen on 0.0.0.0 with no API keys"),
        (["--host", "0.0.0.0", "--api-keys", "k:predict;k2:admin", "--model-name", "nope"],
         "error: no model named 'nope'"),
        (["--host", "0.0.0.0", "--allow-open", "--model-name", "nope"],
         "error: no model named 'nope'"),
        (["--host", "0.0.0.0", "--allow-open", "--no-allow-open"],
         "error: refusing to listen on 0.0.0.0"),
    ],
)
def test_flags_override_the_environment_and_errors_are_one_line(
    model_repo: ModelRepository, flags: list[str], expected: str
) -> None:
    env = {"HALFLABEL_MODEL_DIR": str(model_repo.root), "HALFLABEL_MODEL_NAME": "tiny",
           "HALFLABEL_MAX_BATCH_SIZE": "8"}
    result = run([sys.executable, "-m", "service", "--port", "0", *flags], env)
    assert result.returncode == 1
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
