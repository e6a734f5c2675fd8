"""Mixed precision: the student's ``train.amp`` and the frozen teacher's ``distill.teacher_precision``.

The two are separate because they cost different things: the student's bf16
training changes what it learns (a little), a frozen teacher's bf16 forward
changes only its outputs by rounding, which :func:`teacher_precision_gap`
measures before a run relies on it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Iterable, Optional

import torch

#: Reduced precisions by name; "fp32" runs without autocast.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: The largest drop of the teacher's validation Y-PSNR that "auto" accepts from a reduced precision.
AUTO_MAX_LOSS_DB = 0.02
#: CPU features with which bf16 matrix arithmetic is native (oneDNN uses them for bf16 convolutions).
NATIVE_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


def autocast_for(device: torch.device, amp: str) -> torch.autocast:
    """bf16 autocast when ``amp`` is "bf16", or "auto" on CUDA; a disabled autocast otherwise ("off", "auto" on CPU)."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def cpu_features() -> frozenset:
    """This CPU's feature flags (lower case, as ``/proc/cpuinfo`` and cpuinfo name them), read at run time."""
    flags = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        flags |= {name for name, present in capabilities().items() if present is True}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
                break
    return frozenset(flags)


def native_bf16(device_type: str, cpu_flags: Iterable[str] = (), cuda_bf16: bool = False) -> bool:
    """Whether bf16 is native on a device: CUDA with bf16 support, or a CPU reporting AMX-BF16 or AVX512-BF16."""
    if device_type == "cuda":
        return cuda_bf16
    if device_type == "cpu":
        return any(flag in set(cpu_flags) for flag in NATIVE_BF16_CPU_FEATURES)
    return False


def resolve_teacher_precision(setting: str, device_type: str, cpu_flags: Iterable[str] = (),
                              cuda_bf16: bool = False) -> str:
    """``distill.teacher_precision`` for a device: "auto" is "bf16" where bf16 is native, else "fp32".

    A pure function of the setting and the device's capabilities (the caller reads them:
    :func:`device_capabilities`); the quality check of "auto" is :func:`teacher_precision_gap`.
    """
    if setting not in ("auto", "fp32", *DTYPES):
        raise ValueError(f"distill.teacher_precision must be one of ['auto', 'fp32', 'bf16', 'fp16'], got {setting!r}")
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device_type, cpu_flags, cuda_bf16) else "fp32"


def device_capabilities(device: torch.device) -> dict:
    """The arguments :func:`resolve_teacher_precision` needs for ``device``, read from the machine."""
    if device.type == "cuda":
        return {"cuda_bf16": torch.cuda.is_bf16_supported(including_emulation=False)}
    return {"cpu_flags": cpu_features() if device.type == "cpu" else ()}


def precision_context(device: torch.device, precision: str) -> ContextManager:
    """Autocast to ``precision`` ("bf16", "fp16") on ``device``; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@torch.no_grad()
def teacher_precision_gap(teacher: torch.nn.Module, pairs, device: torch.device, precision: str,
                          scale: int) -> Optional[float]:
    """Mean Y-PSNR of the teacher in fp32 minus in ``precision`` over ``pairs`` of (lr, hr) (B=1), in dB.

    The protocol of :func:`facd_fast.metrics.psnr_y_torch` (the in-training validation's). None
    when there are no pairs.
    """
    from .. import metrics

    totals = {"fp32": 0.0, precision: 0.0}
    count = 0
    for lr, hr in pairs:
        lr = lr[None].to(device)
        for name in totals:
            with precision_context(device, name):
                sr = teacher(lr)
            totals[name] += float(metrics.psnr_y_torch(sr.float().cpu(), hr[None], crop_border=scale).mean())
        count += 1
    if not count:
        return None
    return (totals["fp32"] - totals[precision]) / count
