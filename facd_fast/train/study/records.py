"""The files a study keeps, and the keys that say what they describe.

Each run folder holds ``spec.json`` (what to run: the config file, the
overrides, the resolved config, the evaluation folders) and ``result.json``
(what came of it). Both are written whole or not at all
(:func:`facd_fast.atomic_files.atomic_write`): a study killed mid-write finds
the previous version on its next start.

A run is identified by its resolved config (:func:`config_differences`), not
by the spelling or order of the overrides that made it. An evaluation is
identified by what its numbers depend on (:func:`evaluation_key`): the content
of the evaluation folder, the exported student and the protocol; a recorded
evaluation whose key differs from the current one is stale and is computed again.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ...atomic_files import atomic_write
from ..resume import recorded_config
from ..evaluate import evaluation_protocol

SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"

#: Config keys that do not make another run: the study gives each run its own folder (run.out_dir)
#: and the child process turns the progress bar off (train.progress), whatever the config says.
NOT_IDENTITY = {("run", "out_dir"), ("train", "progress")}

_CHUNK = 1 << 20
_MISSING = object()


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON (NaN kept: a one-seed interval is NaN) in ``path``, replacing it whole."""
    text = json.dumps(value, indent=1, allow_nan=True)
    atomic_write(path, lambda file: file.write(text.encode()))


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); move it away and run again") from None


def file_sha256(path: str | Path) -> Optional[str]:
    """The SHA-256 of a file's content (hex), None when it is not a file.

    Remembered per (path, modification time, size) for the life of the process, so the
    parent's checks before and after the children ran hash each unchanged file once.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    return _content_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size) if path.is_file() else None


@functools.lru_cache(maxsize=4096)
def _content_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_key(folder: str | Path) -> Dict[str, Any]:
    """``{"dir", "folder_sha256", "files"}`` of an evaluation folder: its absolute path, one SHA-256 over the
    relative path and content hash of every file below it (hidden files left out, as the image readers
    leave them out), and how many files that is. A photo added, removed, renamed or edited changes it."""
    root = Path(folder).resolve()
    files = sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{file_sha256(root / name)}\n".encode())
    return {"dir": str(root), "folder_sha256": digest.hexdigest(), "files": len(files)}


def evaluation_key(folder: Mapping[str, Any], checkpoint: Path, scale: int) -> Dict[str, Any]:
    """What an evaluation of the student exported to ``checkpoint`` on ``folder`` (a :func:`folder_key`)
    at x``scale`` depends on: ``{"folder_sha256", "checkpoint_sha256", "protocol"}``."""
    return {"folder_sha256": folder["folder_sha256"], "checkpoint_sha256": file_sha256(checkpoint),
            "protocol": evaluation_protocol(scale)}


def current_evaluations(result: Mapping[str, Any], checkpoint: Path, evals: Mapping[str, Mapping[str, Any]],
                        scale: int) -> Dict[str, Dict[str, Any]]:
    """{name: evaluation} of the evaluations in ``result`` (a result.json) that still describe the folder of
    that name in ``evals``, the student in ``checkpoint`` and the protocol at x``scale``.

    A result without the key (written before evaluations were keyed) is stale: nothing says what it describes.
    """
    if not Path(checkpoint).is_file():
        return {}
    recorded = result.get("evals", {})
    current = {}
    for name, folder in evals.items():
        if name in recorded and recorded[name].get("key") == evaluation_key(folder, checkpoint, scale):
            current[name] = recorded[name]
    return current


def config_differences(recorded: Mapping[str, Mapping[str, Any]], current: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """``"section.key recorded A, now B"`` for each key whose value differs between two resolved configs
    (``load_config``'s result, or one read back from JSON), keys of :data:`NOT_IDENTITY` left out.

    Values are compared as numbers where they are numbers, so ``1e-2`` and ``0.01`` are the same.
    """
    differences = []
    # Keys added to the config after the run was recorded count as what that run did without them.
    filled = recorded_config({section: dict(values) for section, values in recorded.items()})
    for section, values in current.items():
        old = filled.get(section, {})
        for key, value in values.items():
            if (section, key) not in NOT_IDENTITY and old.get(key, _MISSING) != value:
                differences.append(f"{section}.{key} recorded {_shown(old.get(key))}, now {_shown(value)}")
    for section, values in recorded.items():
        for key, value in values.items():
            if key not in current.get(section, {}) and (section, key) not in NOT_IDENTITY:
                differences.append(f"{section}.{key} recorded {_shown(value)}, now no such key")
    return differences


def _shown(value: Any) -> str:
    """A config value as TOML would spell it: 0.001, "edsr-student", true, [1.0, 1.0, 1.0]."""
    return json.dumps(value)

