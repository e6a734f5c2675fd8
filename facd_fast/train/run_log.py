"""Where a run reports: JSON lines (always), TensorBoard (optional), both written by rank 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, Optional


class RunLog:
    """Appends one JSON object per event to ``out_dir/log.jsonl`` and mirrors numbers to TensorBoard.

    Args:
        out_dir: the run folder.
        enabled: False on ranks other than 0: every call is then a no-op.
        tensorboard: also write TensorBoard event files under ``out_dir/tensorboard``.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(out_dir) / "log.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        """One record ``{"kind": kind, "step": step, **values}``; ``kind`` is "train", "val" or "end"."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as file:
            file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)
            self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` and earlier "end" records: a resumed run repeats the steps after its checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if json.loads(line)["step"] <= step and json.loads(line)["kind"] != "end"
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress_postfix(values: Dict[str, float], skipped_steps: int, val_psnr: float) -> Dict[str, str]:
    """What the progress bar shows after a log step: the loss and its terms, the distilled share, skips, validation."""
    shown = {"loss": f"{values['loss']:.4f}"}
    shown.update({name: f"{values[name]:.4f}" for name in ("l1_hr", "l1_teacher", "feature") if name in values})
    if "distilled_fraction" in values:
        shown["distilled"] = f"{values['distilled_fraction']:.2f}"
    if skipped_steps:
        shown["skipped"] = str(skipped_steps)
    shown["val_psnr"] = f"{val_psnr:.2f}"
    return shown


def read_log(path: str | Path, kind: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """The records of a ``log.jsonl``, optionally only those of one kind."""
    with Path(path).open() as file:
        for line in file:
            record = json.loads(line)
            if kind is None or record["kind"] == kind:
                yield record
