"""The trainer behind ``facd train-teacher`` and ``facd distill``.

One loop serves both: ``train-teacher`` trains ``model.teacher`` on L1 to the
ground truth; ``distill`` trains ``model.student`` (plus its DR adapters)
against the frozen ``model.teacher`` with the objective of
:mod:`facd_fast.train.objective`. Single process, or data parallel under
``torchrun`` (gloo on CPU, nccl on GPU) with rank 0 alone logging and writing.

What a run guarantees:

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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import data as sr_data
from .. import metrics, models
from ..atomic_files import atomic_write, remove_stale_temporaries
from ..resources import resolve_path
from .config import Config, ConfigError, dump_config, validate_config
from .data_folders import check_folder, resolve_data_dirs
from .diagnostics import term_gradient_norms
from .distributed import init_process_group, replica_max_abs_diff
from .ema import ModelEMA
from .objective import ADAPTED_METHODS, DistillationObjective, mask_enabled
from .precision import autocast_for
from .run_log import RunLog
from .seeding import seed_everything, seed_worker, set_determinism
from .student import StudentWithAdapters
from .training_state import TRAINING_STATE_KEY, atomic_torch_save, load_training_state, restore_rng_states, rng_states

CHECKPOINT_NAME = "last.pt"
#: Loss terms checked, in this order, to name the one that went non-finite.
LOSS_TERMS = ("l1_hr", "l1_teacher", "feature", "loss")


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradient; the run stopped."""


def run_files(out_dir: Path, stage: str) -> List[Path]:
    """The files and folders a run of ``stage`` writes into its folder ``out_dir`` that exist there now."""
    names = [f"checkpoints/{CHECKPOINT_NAME}", "log.jsonl", "config.toml", f"{stage}.pth", "curves.png",
             "comparison.png", "tensorboard"]
    return [out_dir / name for name in names if (out_dir / name).exists()]


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Trainer:
    """Builds models, data, optimiser and logs from a config, then :meth:`fit` runs the loop.

    Args:
        config: a full config (see :mod:`facd_fast.train.config`).
        mode: "teacher" (train ``model.teacher`` alone) or "distill"
            (train ``model.student`` with ``distill.method``).
        resume: continue from ``out_dir/checkpoints/last.pt`` when it exists.
        overwrite: replace the run the stage folder holds (its files are
            deleted when :meth:`fit` starts). Without ``resume`` or
            ``overwrite`` a stage folder holding a run is an error
            (FileExistsError), raised before anything is written.

    The network being trained has one name per form: ``student`` (the bare
    network, what is validated, checkpointed and exported; under
    train-teacher it is ``model.teacher``, trained alone),
    ``student_with_adapters`` (:class:`StudentWithAdapters`: the student plus
    its DR adapters, what the optimiser updates) and ``train_module`` (what a
    step calls: ``student_with_adapters``, wrapped in DDP under torchrun and
    compiled with ``train.compile``). ``teacher`` is the frozen teacher of a
    distillation run (None under train-teacher).
    """

    def __init__(self, config: Config, *, mode: str, resume: bool = False, overwrite: bool = False) -> None:
        if mode not in ("teacher", "distill"):
            raise ValueError(f"mode must be 'teacher' or 'distill', got {mode!r}")
        if resume and overwrite:
            raise ValueError("resume and overwrite contradict each other: continue the run or replace it, not both")
        validate_config(config, mode)
        self.config = config
        self.mode = mode
        run, model_config, train = config["run"], config["model"], config["train"]
        self.method = "none" if mode == "teacher" else config["distill"]["method"]
        self.stage = "teacher" if mode == "teacher" else self.method
        self.out_dir = Path(run["out_dir"]) / self.stage
        self.checkpoint_path = self.out_dir / "checkpoints" / CHECKPOINT_NAME
        self.export_path = self.out_dir / f"{self.stage}.pth"
        existing = run_files(self.out_dir, self.stage)
        if existing and not (resume or overwrite):
            listed = ", ".join(str(path.relative_to(self.out_dir)) for path in existing)
            raise FileExistsError(
                f"run.out_dir: {self.out_dir} already holds a {self.stage} run ({listed}); pass --resume to "
                f"continue it, --overwrite to replace it, or set another run.out_dir"
            )
        self.files_to_replace = existing if overwrite else []
        if self.method != "none":
            self._teacher_checkpoint_path()  # a missing teacher fails before the data is prepared

        set_determinism(config)
        self.group, self.device = init_process_group(run["device"])
        # Rank 0 writes the built-in photos and the LR cache; the others wait, then read them.
        if not self.group.is_main:
            dist.barrier()
        self.train_dir, self.val_dir = resolve_data_dirs(config)
        check_folder("data.train_hr_dir", self.train_dir)
        if self.val_dir:
            check_folder("data.val_hr_dir", self.val_dir)
        self.dataset = sr_data.PairedFolderDataset(
            self.train_dir, model_config["scale"], config["data"]["patch_size"],
            lr_dir=config["data"]["train_lr_dir"] or None, cache_dir=config["data"]["cache_dir"] or None,
            augment=config["data"]["augment"], repeat=config["data"]["repeat"],
        )
        if self.group.distributed and self.group.is_main:
            dist.barrier()
        seed_everything(run["seed"])

        scale = model_config["scale"]
        self.student = models.build(model_config["teacher" if mode == "teacher" else "student"], scale)
        self.teacher = self._load_teacher() if self.method != "none" else None
        adapters = None
        if self.method in ADAPTED_METHODS:
            # From their own seed: the global RNG (hence anything drawn after) stays as for "none".
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run["seed"] + 1)
                adapters = models.DRAdapters(self.student.num_feat, self.teacher.num_feat, num_taps=len(self.student.taps))
        self.objective = self._build_objective()
        self.student_with_adapters = StudentWithAdapters(
            self.student, adapters, with_features=self.method != "none"
        ).to(self.device)
        if train["channels_last"]:
            self.student_with_adapters.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.student, train["ema_decay"]) if train["ema_decay"] > 0 else None

        self.optimizer = torch.optim.Adam(
            self.student_with_adapters.parameters(), lr=train["lr"], betas=tuple(train["betas"]),
            weight_decay=train["weight_decay"],
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=train["lr_step"], gamma=train["lr_gamma"])

        self.step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.elapsed_s = 0.0
        self.last_val_psnr = float("nan")
        self.skipped_steps = 0
        self.bad_streak = 0
        self.checkpoint_step: Optional[int] = None  # the step of the checkpoint on disk, once there is one
        if resume and self.checkpoint_path.is_file():
            self._load_state(load_training_state(self.checkpoint_path))
        # Each rank draws different crops and flips (a resume restores each rank's own RNG states).
        elif self.group.distributed:
            seed_everything(run["seed"] + self.group.rank)

        per_step = train["batch_size"] * self.group.world_size
        if len(self.dataset) < per_step:
            raise ConfigError(
                f"the training set has {len(self.dataset)} patches per epoch, fewer than one step needs "
                f"(train.batch_size x world size = {per_step}); raise data.repeat"
            )
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.group.world_size, rank=self.group.rank, shuffle=True,
            seed=run["seed"], drop_last=True,
        )
        self.val_set = (
            sr_data.BenchmarkFolder(self.val_dir, scale, lr_dir=config["data"]["val_lr_dir"] or None)
            if self.val_dir else None
        )

        self.train_module = self.student_with_adapters
        if self.group.distributed:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.student_with_adapters, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if train["compile"]:
            self.train_module = torch.compile(self.train_module)
            if self.teacher is not None:
                self.teacher = torch.compile(self.teacher)
        self.log = RunLog(self.out_dir, enabled=self.group.is_main, tensorboard=train["tensorboard"])

    def _teacher_checkpoint_path(self) -> Path:
        """The file ``model.teacher_checkpoint`` names; an error naming the setting when there is none."""
        setting = self.config["model"]["teacher_checkpoint"]
        if not setting:
            raise ConfigError(f"model.teacher_checkpoint is required to distil (method {self.method!r})")
        path = resolve_path(setting)
        if not path.is_file():
            where = "" if str(path) == setting else f" (looked for {str(path)!r})"
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"model.teacher_checkpoint: file {setting!r} {what}{where}")
        return path

    def _load_teacher(self) -> nn.Module:
        model_config = self.config["model"]
        setting = model_config["teacher_checkpoint"]
        path = self._teacher_checkpoint_path()
        teacher = models.model_from_checkpoint(path, preset=model_config["teacher"], scale=model_config["scale"])
        if teacher.scale != model_config["scale"]:
            raise ConfigError(f"the teacher in {setting!r} is a x{teacher.scale} model, model.scale is {model_config['scale']}")
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.config["train"]["channels_last"]:
            teacher.to(memory_format=torch.channels_last)
        return teacher

    def _build_objective(self) -> DistillationObjective:
        distill = self.config["distill"]
        tap_weights = distill["tap_weights"]
        if self.method != "none" and len(tap_weights) != len(self.student.taps):
            raise ConfigError(
                f"distill.tap_weights has {len(tap_weights)} weights, the student has {len(self.student.taps)} taps"
            )
        if self.method != "none" and len(self.teacher.taps) != len(self.student.taps):
            raise ConfigError(f"student and teacher must have as many taps, got {len(self.student.taps)} and {len(self.teacher.taps)}")
        return DistillationObjective(
            self.method, alpha=distill["alpha"], feature_weight=distill["lambda"], tap_weights=tap_weights,
            use_mask=mask_enabled(self.method, distill["use_mask"]), margin_db=distill["margin_db"],
            distance=distill["distance"], normalize=distill["normalize"], backend=distill["backend"],
        )

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        adapters = self.student_with_adapters.adapters
        return {
            TRAINING_STATE_KEY: True,
            "mode": self.mode,
            "method": self.method,
            "config": self.config,
            "step": self.step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "elapsed_s": self.elapsed_s,
            "last_val_psnr": self.last_val_psnr,
            "skipped_steps": self.skipped_steps,
            "model_meta": models.model_meta(self.student),
            "model": self.student.state_dict(),
            "adapters": None if adapters is None else adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": self._rng_states_of_all_ranks(),
        }

    def _rng_states_of_all_ranks(self) -> List[Dict[str, Any]]:
        """Every rank's RNG states, in rank order (collective: all ranks must call it)."""
        if not self.group.distributed:
            return [rng_states()]
        states: List[Any] = [None] * self.group.world_size
        dist.all_gather_object(states, rng_states())
        return states

    def _load_state(self, state: Dict[str, Any]) -> None:
        if state["mode"] != self.mode or state["method"] != self.method:
            raise ConfigError(
                f"{self.checkpoint_path} was written by a {state['mode']}/{state['method']} run, "
                f"this is a {self.mode}/{self.method} run; use another run.out_dir"
            )
        self.student.load_state_dict(state["model"])
        if self.student_with_adapters.adapters is not None:
            self.student_with_adapters.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ConfigError(f"{self.checkpoint_path} holds no EMA weights but train.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        self.elapsed_s, self.last_val_psnr = state["elapsed_s"], state["last_val_psnr"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.checkpoint_step = self.step
        if len(state["rng"]) != self.group.world_size:
            raise ConfigError(
                f"{self.checkpoint_path} was written by {len(state['rng'])} process(es), this run has "
                f"{self.group.world_size}: resume with as many processes"
            )
        restore_rng_states(state["rng"][self.group.rank])

    def save_checkpoint(self) -> None:
        """Collective (every rank contributes its RNG states); rank 0 writes, never a non-finite weight."""
        state = self.state_dict()
        if self.group.is_main:
            for part in ("model", "adapters", "ema"):
                if state[part] is not None:
                    models.check_finite(state[part], f"refusing to write {self.checkpoint_path}: {part}")
            atomic_torch_save(state, self.checkpoint_path)
        self.checkpoint_step = self.step

    @property
    def eval_network(self) -> nn.Module:
        """The weights to validate and export: the EMA when there is one."""
        return self.ema.shadow if self.ema is not None else self.student

    # --- data ------------------------------------------------------------------------------------
    def _epoch_batches(self):
        """Batches of the current epoch from where the last run stopped: the order depends only on (seed, epoch)."""
        self.sampler.set_epoch(self.epoch)
        # Crops and flips are seeded by each patch's place in the run, not drawn from the global RNG,
        # so that runs with the same seed see the same patches whatever the method (sr_data.SeededPatches).
        keys = [(self.epoch, self.group.rank, position, index) for position, index in enumerate(self.sampler)]
        keys = keys[self.batches_done_in_epoch * self.config["train"]["batch_size"]:]
        loader = DataLoader(
            sr_data.SeededPatches(self.dataset, self.config["run"]["seed"]),
            batch_size=self.config["train"]["batch_size"], sampler=keys, drop_last=True,
            num_workers=self.config["data"]["num_workers"], pin_memory=self.device.type == "cuda",
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.config["run"]["seed"] * 100003 + self.epoch),
        )
        return iter(loader)

    def _batches(self):
        while True:
            for batch in self._epoch_batches():
                yield batch
            self.epoch += 1
            self.batches_done_in_epoch = 0

    # --- loop ------------------------------------------------------------------------------------
    def train_step(self, lr: Tensor, hr: Tensor, diagnose: bool = False) -> Tuple[Dict[str, Tensor], Optional[str]]:
        """One step: ``(terms, problem)``; ``problem`` names what went non-finite, and then no weight changed.
        ``diagnose`` adds each objective term's gradient norm into the student to the terms."""
        train, distill = self.config["train"], self.config["distill"]
        self.train_module.train()
        if self.method != "none" and distill["lambda_warmup"] > 0:
            self.objective.feature_weight = distill["lambda"] * min(1.0, (self.step + 1) / distill["lambda_warmup"])
        with autocast_for(self.device, train["amp"]):
            sr, features = self.train_module(lr)
            sr_teacher = teacher_features = None
            if self.teacher is not None:
                with torch.no_grad():
                    sr_teacher, teacher_features = self.teacher(lr, return_features=True)
            loss, terms, parts = self.objective(sr, features, sr_teacher, teacher_features, hr, return_parts=True)
        if self.method != "none":
            terms["lambda"] = torch.tensor(self.objective.feature_weight, dtype=torch.float64)
        if diagnose:
            terms.update(term_gradient_norms(parts, list(self.student.parameters())))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        problem = self._non_finite(loss, terms)
        if problem is None:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.student)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, taken or skipped
        return terms, problem

    def _non_finite(self, loss: Tensor, terms: Dict[str, Tensor]) -> Optional[str]:
        """None when the loss and every gradient are finite (on every rank), else what was not."""
        grads = [p.grad for p in self.student_with_adapters.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        bad = (~finite).to(torch.float32)
        if self.group.distributed:  # every rank must skip together, or DDP's replicas drift apart
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return None
        for name in LOSS_TERMS:
            if name in terms and not torch.isfinite(terms[name]):
                return f"the {name} term is {float(terms[name])}"
        for name, parameter in self.student_with_adapters.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                return f"the gradient of {name} holds NaN/Inf"
        return "another process's loss or gradient is non-finite"

    def fit(self) -> Dict[str, Any]:
        """Train to ``train.iterations``; returns the run's summary (also the last log record)."""
        from tqdm.auto import tqdm

        train = self.config["train"]
        total = train["iterations"]
        if self.group.is_main:
            for path in self.files_to_replace:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            for path in (self.checkpoint_path, self.export_path):
                remove_stale_temporaries(path)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / "config.toml", lambda file: file.write(dump_config(self.config).encode()))
            self.log.truncate_after(self.step)
        bar = tqdm(
            total=total, initial=self.step, desc=self.stage, unit="it",
            disable=not (self.group.is_main and train["progress"]), dynamic_ncols=True,
        )
        batches = self._batches()
        window_start, window_steps = time.perf_counter(), 0
        shown: Dict[str, float] = {}
        while self.step < total:
            started = time.perf_counter()
            lr, hr = next(batches)
            # Gradient diagnostics on log steps only (each costs a backward pass), and not under DDP,
            # whose reducer expects exactly one backward per forward.
            logging = (self.step + 1) % train["log_every"] == 0 or self.step + 1 == total
            terms, problem = self.train_step(
                _to_device(lr, self.device, train["channels_last"]), _to_device(hr, self.device, train["channels_last"]),
                diagnose=logging and train["grad_norms"] and not self.group.distributed,
            )
            self.step += 1
            if problem is not None:
                self._skipped(problem, bar)
            else:
                self.bad_streak = 0
            self.batches_done_in_epoch += 1
            self.elapsed_s += time.perf_counter() - started
            window_steps += 1
            bar.update(1)
            if self.step % train["log_every"] == 0 or self.step == total:
                values = {name: float(value) for name, value in terms.items()}
                values["lr"] = self.scheduler.get_last_lr()[0]
                values["it_s"] = window_steps / max(time.perf_counter() - window_start, 1e-9)
                values["elapsed_s"] = self.elapsed_s
                values["skipped_steps"] = self.skipped_steps
                self.log.write("train", self.step, values)
                window_start, window_steps = time.perf_counter(), 0
                shown = values
            if self.val_set is not None and (self.step % train["val_every"] == 0 or self.step == total):
                self.validate()
            if shown:
                bar.set_postfix(self._postfix(shown), refresh=False)
            # Not after a skipped step: the checkpoint stays at the last step that trained.
            if (self.step % train["checkpoint_every"] == 0 or self.step == total) and not self.bad_streak:
                self.save_checkpoint()
        bar.close()
        return self._finish()

    def _skipped(self, problem: str, bar) -> None:
        """Count a skipped step; stop the run after ``train.max_bad_steps`` in a row."""
        self.skipped_steps += 1
        self.bad_streak += 1
        limit = self.config["train"]["max_bad_steps"]
        self.log.write("skip", self.step, {"problem": problem, "in_a_row": self.bad_streak,
                                           "skipped_steps": self.skipped_steps})
        bar.set_postfix(skipped=self.skipped_steps, refresh=False)
        if self.bad_streak == 1 and self.group.is_main:
            bar.write(f"facd: warning: step {self.step}: {problem}; the step is skipped (no weight changed)",
                      file=sys.stderr)
        if self.bad_streak < limit:
            return
        saved = (f"{self.checkpoint_path} holds step {self.checkpoint_step}" if self.checkpoint_step is not None
                 else "no checkpoint had been written yet")
        message = (f"training diverged: {self.bad_streak} steps in a row (steps {self.step - self.bad_streak + 1} to "
                   f"{self.step}) had a non-finite loss or gradient; at step {self.step} {problem}. No weight was "
                   f"updated by them and nothing was written for them; {saved}. Lower train.lr (now "
                   f"{self.config['train']['lr']:g}) or raise train.max_bad_steps ({limit}).")
        self.log.write("diverged", self.step, {"problem": problem, "in_a_row": self.bad_streak})
        self.log.close()
        bar.close()
        raise TrainingDiverged(message)

    def _postfix(self, values: Dict[str, float]) -> Dict[str, str]:
        shown = {"loss": f"{values['loss']:.4f}"}
        for name in ("l1_hr", "l1_teacher", "feature"):
            if name in values:
                shown[name] = f"{values[name]:.4f}"
        if "distilled_fraction" in values:
            shown["distilled"] = f"{values['distilled_fraction']:.2f}"
        if self.skipped_steps:
            shown["skipped"] = str(self.skipped_steps)
        shown["val_psnr"] = f"{self.last_val_psnr:.2f}"
        return shown

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Y-PSNR of the eval network on the validation images (rank 0; other ranks keep the last value)."""
        if not self.group.is_main:
            return self.last_val_psnr
        data_config = self.config["data"]
        scale = self.config["model"]["scale"]
        network = self.eval_network
        was_training = network.training
        network.eval()
        psnrs = []
        for index, (_, lr, hr) in enumerate(self.val_set):
            if data_config["val_max_images"] and index >= data_config["val_max_images"]:
                break
            lr, hr = center_crop_pair(lr, hr, scale, data_config["val_crop"])
            with autocast_for(self.device, self.config["train"]["amp"]):
                sr = network(lr[None].to(self.device))
            psnrs.append(metrics.psnr_y_torch(sr.float().cpu(), hr[None], crop_border=scale))
        network.train(was_training)
        self.last_val_psnr = float(torch.cat(psnrs).mean())
        self.log.write("val", self.step, {"val_psnr_y": self.last_val_psnr})
        return self.last_val_psnr

    def _finish(self) -> Dict[str, Any]:
        summary: Dict[str, Any] = {
            "mode": self.mode, "method": self.method, "steps": self.step, "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
            "val_psnr_y": self.last_val_psnr, "world_size": self.group.world_size,
        }
        if self.group.distributed:
            summary["replica_max_abs_diff"] = replica_max_abs_diff(self.student_with_adapters)
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
            self.train_module = self.student_with_adapters
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        return summary


def center_crop_pair(lr: Tensor, hr: Tensor, scale: int, hr_size: int) -> Tuple[Tensor, Tensor]:
    """The centre crop of at most ``hr_size`` HR pixels a side (0: no crop), LR cropped to match."""
    if hr_size <= 0:
        return lr, hr
    lr_size = hr_size // scale
    top, left = max(0, (lr.shape[-2] - lr_size) // 2), max(0, (lr.shape[-1] - lr_size) // 2)
    lr = lr[..., top:top + lr_size, left:left + lr_size]
    return lr, hr[..., top * scale:(top + lr.shape[-2]) * scale, left * scale:(left + lr.shape[-1]) * scale]
