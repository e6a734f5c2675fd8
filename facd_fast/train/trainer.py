"""The loop behind ``facd train-teacher`` and ``facd distill``: when to step, validate, save and log.

What a step computes (networks, taps, adapters, teacher, objective, precision)
is :class:`facd_fast.train.distiller.Distiller`'s; the loop owns the data, the
optimiser and its schedule, the EMA, the divergence guard, checkpoints and
logs. Single process, or data parallel under ``torchrun`` (gloo on CPU, nccl
on GPU) with rank 0 alone logging and writing. What a run guarantees:

- a step whose loss or gradient holds NaN/Inf changes no weight (the update
  is skipped, counted in the log and the progress bar); ``train.max_bad_steps``
  of them in a row stop the run with :class:`TrainingDiverged`, naming the
  step and the term, and nothing is written for them;
- no checkpoint or export is written with a non-finite weight;
- a stage folder that holds a run is never written into unless the run is
  resumed (``resume``) or replaced (``overwrite``);
- temporary files of a write that was killed are removed by the next run.
"""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import models
from ..atomic_files import atomic_write, remove_stale_temporaries
from .batches import open_data, run_batches, training_sampler
from .config import Config, ConfigError, dump_config, validate_config
from .distiller import Distiller, teacher_checkpoint_path
from .distributed import init_process_group, replica_max_abs_diff
from .ema import ModelEMA
from .guard import DivergenceGuard, TrainingDiverged, non_finite
from .resume import apply_optimizer_settings, check_resume, history_header, recorded_config
from .run_log import RunLog, progress_postfix
from .seeding import seed_everything, set_determinism
from .step_timer import StepTimer
from .training_state import (CHECKPOINT_NAME, RunCounters, files_to_replace, load_training_state, run_files,
                             save_training_state)
from .validation import validation_pairs, validation_psnr

__all__ = ["Trainer", "TrainingDiverged", "run_files", "CHECKPOINT_NAME"]


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Trainer:
    """Builds the run from a config (data, :class:`Distiller`, optimiser, logs); :meth:`fit` runs the loop.

    Args:
        config: a full config (see :mod:`facd_fast.train.config`).
        mode: "teacher" (train ``model.teacher`` alone) or "distill"
            (train ``model.student`` with ``distill.method``).
        resume: continue from ``out_dir/checkpoints/last.pt`` when it exists, with the settings it
            was trained with (:mod:`facd_fast.train.resume` says which may change).
        resume_with_changes: resume, and let settings other than the network change from the next
            step (recorded in the log, the checkpoint and config.toml's history).
        overwrite: replace the run the stage folder holds (its files are
            deleted when :meth:`fit` starts). Without ``resume`` or
            ``overwrite`` a stage folder holding a run is an error
            (FileExistsError), raised before anything is written.
        timer: times the phases of each step (``facd bench``'s breakdown); off by default.

    ``model`` is the :class:`Distiller`; ``student`` its bare network (what is
    validated, checkpointed and exported; under train-teacher ``model.teacher``,
    trained alone), ``teacher`` its frozen teacher (None under train-teacher).
    """

    def __init__(self, config: Config, *, mode: str, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False, timer: Optional[StepTimer] = None) -> None:
        resume = resume or resume_with_changes
        if mode not in ("teacher", "distill"):
            raise ValueError(f"mode must be 'teacher' or 'distill', got {mode!r}")
        if resume and overwrite:
            raise ValueError("resume and overwrite contradict each other: continue the run or replace it, not both")
        validate_config(config, mode)
        self.config, self.mode = config, mode
        run, train = config["run"], config["train"]
        self.method = "none" if mode == "teacher" else config["distill"]["method"]
        self.stage = "teacher" if mode == "teacher" else self.method
        self.out_dir = Path(run["out_dir"]) / self.stage
        self.checkpoint_path = self.out_dir / "checkpoints" / CHECKPOINT_NAME
        self.export_path = self.out_dir / f"{self.stage}.pth"
        self.files_to_replace = files_to_replace(self.out_dir, self.stage, resume, overwrite)
        if self.method != "none":
            teacher_checkpoint_path(config, self.method)  # a missing teacher fails before the data is prepared

        set_determinism(config)
        self.group, self.device = init_process_group(run["device"])
        self.timer = timer or StepTimer(self.device)
        self.dataset, self.val_set = open_data(config, self.group)
        seed_everything(run["seed"])

        self.model = Distiller(config, mode, self.device, self.timer)
        self.val_pairs = validation_pairs(self.val_set, config) if self.val_set is not None else []
        self.model.check_teacher_precision(self.val_pairs)
        self.student, self.teacher = self.model.student, self.model.teacher
        self.ema = ModelEMA(self.student, train["ema_decay"]) if train["ema_decay"] > 0 else None
        # foreach: one call per step for all the tensors (CPU too), the same arithmetic as the loop
        self.optimizer = torch.optim.Adam(self.model.trainable.parameters(), lr=train["lr"], foreach=True,
                                          betas=tuple(train["betas"]), weight_decay=train["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=train["lr_step"],
                                                         gamma=train["lr_gamma"])
        self.counters = RunCounters()
        self.guard = DivergenceGuard(train["max_bad_steps"])
        self.checkpoint_step: Optional[int] = None  # the step of the checkpoint on disk, once there is one
        self.config_history: List[Dict[str, Any]] = []  # the settings changed on resume, and from which step
        self.resume_changes: List[Dict[str, Any]] = []
        if resume and self.checkpoint_path.is_file():
            self._load_state(load_training_state(self.checkpoint_path), resume_with_changes)
        elif self.group.distributed:  # each rank draws other crops and flips (a resume restores each rank's RNG)
            seed_everything(run["seed"] + self.group.rank)

        self.sampler = training_sampler(self.dataset, config, self.group)
        self.model.wrap(self.group.distributed, train["compile"])
        self.log = RunLog(self.out_dir, enabled=self.group.is_main, tensorboard=train["tensorboard"])

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def eval_network(self) -> torch.nn.Module:
        """The weights to validate and export: the EMA when there is one."""
        return self.ema.shadow if self.ema is not None else self.student

    # --- state -----------------------------------------------------------------------------------
    def _load_state(self, state: Dict[str, Any], allow_changes: bool) -> None:
        if state["mode"] != self.mode or state["method"] != self.method:
            raise ConfigError(f"{self.checkpoint_path} was written by a {state['mode']}/{state['method']} run, "
                              f"this is a {self.mode}/{self.method} run; use another run.out_dir")
        recorded = recorded_config(state["config"])
        precision = None
        if self.teacher is not None:
            precision = (state.get("teacher_precision", recorded["distill"]["teacher_precision"]),
                         self.model.teacher_precision)
        self.resume_changes = check_resume(state["config"], self.config, self.mode, allow_changes,
                                           self.checkpoint_path, state["step"], precision)
        self.config_history = [*state.get("config_history", []), *self.resume_changes]
        self.counters = RunCounters.restore(state, self.checkpoint_path, self.model, self.optimizer,
                                            self.scheduler, self.ema, self.group)
        schedule = ("lr", "lr_step", "lr_gamma", "betas", "weight_decay")
        if any(recorded["train"][key] != self.config["train"][key] for key in schedule):
            apply_optimizer_settings(self.optimizer, self.scheduler, self.config["train"])
        self.guard.skipped_steps = self.counters.skipped_steps
        self.checkpoint_step = self.step

    def save_checkpoint(self) -> None:
        """Collective (every rank contributes its RNG states); rank 0 writes, never a non-finite weight."""
        self.counters.skipped_steps = self.guard.skipped_steps
        save_training_state(self.checkpoint_path, self, write=self.group.is_main)
        self.checkpoint_step = self.step

    def _batches(self):
        return run_batches(self.dataset, self.sampler, self.counters, self.config, self.group.rank, self.device)

    # --- loop ------------------------------------------------------------------------------------
    def train_step(self, lr: Tensor, hr: Tensor, diagnose: bool = False) -> Tuple[Dict[str, Tensor], Optional[str]]:
        """One step: ``(terms, problem)``; ``problem`` names what went non-finite, and then no weight changed.
        ``diagnose`` adds each objective group's gradient norm into the student to the terms."""
        timer = self.timer
        loss, terms, parts = self.model.losses(lr, hr, self.step)
        with timer("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(retain_graph=diagnose)
        if diagnose:
            with timer("diagnostics"):
                terms.update(self.model.gradient_diagnostics(parts))
        with timer("guard"):
            checked = {name: terms[name] for name in (*self.model.objective.log_keys.values(), "loss")}
            problem = non_finite(loss, checked, self.model.trainable.named_parameters(), self.group.distributed)
        if problem is None:
            with timer("optimizer"):
                self.optimizer.step()
            if self.ema is not None:
                with timer("ema"):
                    self.ema.update(self.student)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, taken or skipped
        return terms, problem

    def _prepare_out_dir(self) -> None:
        """Rank 0: delete what --overwrite replaces and stale temporaries; write the config; drop log records past the step."""
        if not self.group.is_main:
            return
        for path in self.files_to_replace:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for path in (self.checkpoint_path, self.export_path):
            remove_stale_temporaries(path)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = history_header(self.config_history) + dump_config(self.config)
        atomic_write(self.out_dir / "config.toml", lambda file: file.write(text.encode()))
        self.log.truncate_after(self.step)
        if self.model.precision_check and not self.step:
            self.log.write("setup", 0, self.model.precision_check)
        if self.resume_changes:
            self.log.write("resume", self.step, {"changes": self.resume_changes})

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.iterations``; returns the run's summary (also the last log record)."""
        from tqdm.auto import tqdm

        train = self.config["train"]
        self._prepare_out_dir()
        bar = tqdm(total=train["iterations"], initial=self.step, desc=self.stage, unit="it",
                   disable=not (self.group.is_main and train["progress"]), dynamic_ncols=True)
        batches, self._window = self._batches(), (time.perf_counter(), 0)
        while self.step < train["iterations"]:
            self.iteration(batches, bar)
        bar.close()
        return self._finish()

    def iteration(self, batches, bar=None) -> None:
        """One step of the loop: data, the step, its guard, and the log, validation and checkpoint it is due."""
        train, counters, timer = self.config["train"], self.counters, self.timer
        started = time.perf_counter()
        with timer("data"):
            lr, hr = next(batches)
            lr, hr = (_to_device(x, self.device, train["channels_last"]) for x in (lr, hr))
        # Gradient diagnostics on log steps only (each costs a backward pass), and not under DDP,
        # whose reducer expects exactly one backward per forward.
        total = train["iterations"]
        logging = (self.step + 1) % train["log_every"] == 0 or self.step + 1 == total
        terms, problem = self.train_step(lr, hr, diagnose=logging and train["grad_norms"] and not self.group.distributed)
        counters.step += 1
        counters.batches_done_in_epoch += 1
        if problem is not None:
            self._skipped(problem, bar)
        else:
            self.guard.passed()
        counters.elapsed_s += time.perf_counter() - started
        window_start, window_steps = getattr(self, "_window", (started, 0))
        self._window = (window_start, window_steps + 1)
        if bar is not None:
            bar.update(1)
        if self.step % train["log_every"] == 0 or self.step == total:
            with timer("log"):
                values = {name: float(value) for name, value in terms.items()}
                values.update(lr=self.scheduler.get_last_lr()[0], elapsed_s=counters.elapsed_s,
                              it_s=self._window[1] / max(time.perf_counter() - window_start, 1e-9),
                              skipped_steps=self.guard.skipped_steps)
                self.log.write("train", self.step, values)
                self._window = (time.perf_counter(), 0)
                if bar is not None:
                    bar.set_postfix(progress_postfix(values, self.guard.skipped_steps, counters.last_val_psnr),
                                    refresh=False)
        if self.val_set is not None and (self.step % train["val_every"] == 0 or self.step == total):
            with timer("validate"):
                self.validate()
        # Not after a skipped step: the checkpoint stays at the last step that trained.
        if (self.step % train["checkpoint_every"] == 0 or self.step == total) and not self.guard.streak:
            with timer("checkpoint"):
                self.save_checkpoint()

    def _skipped(self, problem: str, bar) -> None:
        """Log a skipped step; stop the run after ``train.max_bad_steps`` in a row."""
        saved = (f"{self.checkpoint_path} holds step {self.checkpoint_step}" if self.checkpoint_step is not None
                 else "no checkpoint had been written yet")
        self.guard.skipped(self.step, problem, saved, self.config["train"]["lr"], self.log, bar,
                           warn=self.group.is_main)

    def validate(self) -> float:
        """Mean Y-PSNR of the eval network on the validation images (rank 0; other ranks keep the last value)."""
        if self.group.is_main:
            self.counters.last_val_psnr = validation_psnr(self.eval_network, self.val_pairs, self.device, self.config)
            self.log.write("val", self.step, {"val_psnr_y": self.counters.last_val_psnr})
        return self.counters.last_val_psnr

    def _finish(self) -> Dict[str, Any]:
        summary: Dict[str, Any] = {"mode": self.mode, "method": self.method, "steps": self.step,
                                   "skipped_steps": self.guard.skipped_steps, "elapsed_s": self.counters.elapsed_s,
                                   "val_psnr_y": self.counters.last_val_psnr, "world_size": self.group.world_size}
        if self.group.distributed:
            summary["replica_max_abs_diff"] = replica_max_abs_diff(self.model.trainable)
        if self.group.is_main:
            models.save_checkpoint_basicsr(self.eval_network, self.export_path)
            summary["export"] = str(self.export_path)
            if self.config["train"]["plots"]:
                from .plots import plot_run

                summary["plots"] = [str(p) for p in plot_run(self)]
            self.log.write("end", self.step, summary)
        self.log.close()
        if self.group.distributed:
            # The DDP wrapper holds the process group: drop it so that the group is torn
            # down here, with every rank present (the barrier), and not by the garbage
            # collector after a peer has exited, where gloo's teardown can wait forever.
            self.model.train_module = self.model.trainable
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        return summary
