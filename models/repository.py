"""The model repository: `<root>/<name>/<version>/{model.onnx, manifest.json, ...}`.

Versions are increasing integers, immutable once published. Publishing stages every file in a
hidden temp directory, fsyncs it, then claims the next number with one `rename`: a reader sees a
whole version or none, and two publishers racing for a number cannot both win it (renaming onto
an existing, non-empty directory fails). A publisher killed mid-way leaves its staging
directory behind; the next publish of that name removes it once it is surely abandoned.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from models.errors import InvalidArtifactError, ModelNotFoundError, TamperedArtifactError
from models.manifest import NAME_PATTERN, Manifest, ManifestDraft

MODEL_FILE = "model.onnx"
FP16_MODEL_FILE = "model.fp16.onnx"
MANIFEST_FILE = "manifest.json"
DEFAULT_ROOT = Path("models/store")  # programs' settings override it (HALFLABEL_MODEL_DIR)
STAGING_PREFIX = ".staging-"
# A staging directory untouched this long is abandoned even if its owner cannot be checked (it
# was made on another host sharing the volume); publishing copies a few files in seconds.
STALE_STAGING_S = 3600.0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_reference(reference: str) -> tuple[str, int | None]:
    """Split `name` or `name:version` (version may be `latest`)."""
    name, _, version = reference.partition(":")
    if version in ("", "latest"):
        return name, None
    if not version.isdigit():
        raise ModelNotFoundError(f"bad model reference {reference!r}: use NAME or NAME:VERSION")
    return name, int(version)


@dataclass(frozen=True)
class Artifact:
    """One published, verified version on disk."""

    path: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def fp16_onnx_path(self) -> Path | None:
        return self.path / FP16_MODEL_FILE if self.manifest.fp16_onnx_sha256 else None


class ModelRepository:
    """Publish, list, resolve and verify model versions under one root directory."""

    def __init__(self, root: Path | str = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Model names that have at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Published versions of `name`, oldest first; temp directories are never listed."""
        directory = self.root / name
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def latest_version(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"no model named {name!r} in {self.root} (models there: {known}); "
                "train one with 'halflabel-train fit'"
            )
        return versions[-1]

    def resolve(self, name: str, version: int | None = None) -> Artifact:
        """Load and verify `name` at `version` (latest when None)."""
        if version is None:
            version = self.latest_version(name)
        path = self.root / name / str(version)
        if not path.is_dir():
            available = ", ".join(map(str, self.versions(name))) or "none"
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} in {self.root} (versions: {available})"
            )
        artifact = Artifact(path, self._read_manifest(path))
        verify(artifact)
        return artifact

    def publish(
        self,
        name: str,
        onnx_file: Path,
        draft: ManifestDraft,
        *,
        fp16_onnx_file: Path | None = None,
        extra_files: Mapping[str, Path] | None = None,
    ) -> Artifact:
        """Publish a new version of `name` atomically and return it."""
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"bad model name {name!r}: use lowercase letters, digits, '-' and '_'")
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        remove_abandoned_staging(directory)
        owner = f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}@"
        staging = Path(tempfile.mkdtemp(prefix=owner, dir=directory))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a service user
        try:
            files = {MODEL_FILE: onnx_file, **(extra_files or {})}
            if fp16_onnx_file is not None:
                files[FP16_MODEL_FILE] = fp16_onnx_file
            for target, source in files.items():
                shutil.copyfile(source, staging / target)
            hashes = {
                "onnx_sha256": sha256_file(staging / MODEL_FILE),
                "fp16_onnx_sha256": (
                    sha256_file(staging / FP16_MODEL_FILE) if fp16_onnx_file else None
                ),
            }
            return self._claim_next_version(directory, staging, name, draft, hashes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _claim_next_version(
        self, directory: Path, staging: Path, name: str, draft: ManifestDraft, hashes: dict
    ) -> Artifact:
        while True:
            version = max(self.versions(name), default=0) + 1
            manifest = Manifest(**draft.model_dump(), **hashes, name=name, version=version)
            (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            _fsync_tree(staging)
            target = directory / str(version)
            try:
                staging.rename(target)
            except OSError:
                if target.exists():
                    continue  # another publisher took this number first
                raise
            _fsync_dir(directory)
            return Artifact(target, manifest)

    @staticmethod
    def _read_manifest(path: Path) -> Manifest:
        try:
            return Manifest.model_validate_json((path / MANIFEST_FILE).read_bytes())
        except FileNotFoundError as exc:
            raise InvalidArtifactError(f"{path} has no {MANIFEST_FILE}; republish it") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise InvalidArtifactError(
                f"{path / MANIFEST_FILE} is invalid at {where}: {first['msg']}"
            ) from exc


def remove_abandoned_staging(directory: Path) -> list[Path]:
    """Remove the staging directories in `directory` that no publisher is still writing: those
    whose process, on this host, has died, and any untouched for `STALE_STAGING_S`."""
    removed = []
    for path in directory.glob(f"{STAGING_PREFIX}*"):
        try:
            abandoned = (_owner_is_dead(path.name)
                         or time.time() - path.stat().st_mtime > STALE_STAGING_S)
        except FileNotFoundError:
            continue  # its publisher just renamed or removed it
        if abandoned:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owner_is_dead(name: str) -> bool:
    """Whether the process named in `.staging-PID@HOST@...` is gone; False when unknowable."""
    pid, _, rest = name.removeprefix(STAGING_PREFIX).partition("@")
    host = rest.partition("@")[0]
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def verify(artifact: Artifact) -> None:
    """Raise TamperedArtifactError unless the ONNX files match the manifest's sha256."""
    expected = {MODEL_FILE: artifact.manifest.onnx_sha256}
    if artifact.manifest.fp16_onnx_sha256:
        expected[FP16_MODEL_FILE] = artifact.manifest.fp16_onnx_sha256
    for filename, digest in expected.items():
        path = artifact.path / filename
        if not path.is_file():
            raise InvalidArtifactError(f"{path} is missing; republish this version")
        if sha256_file(path) != digest:
            raise TamperedArtifactError(
                f"{path} does not match the sha256 in its manifest (tampered or corrupt); "
                "republish this version"
            )


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
