"""Fused kernels before/after and FitNet, forward+backward, in CPU time of one thread (thread_time), interleaved.

On a shared machine the wall time of a 2-thread call depends on the other
processes; the CPU time of a 1-thread call much less. This compares, call by
call in turn, the fused loss (``backend="auto"``), the fused loss of an older
checkout's C++ kernels (``--baseline-csrc``, see facd_fast.bench.kernels) and
eager FitNet (F.l1_loss / F.mse_loss), at the EDSR and RCAN taps, l1 and l2,
float32 and bfloat16, and writes bench/results/kernels-1thread-cpu.csv.

    python bench/fused_before_after.py --baseline-csrc OLD_CHECKOUT/csrc
"""
import argparse
import csv
import statistics
import time

import torch

from facd_fast.bench import kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-csrc", required=True, help="an older checkout's csrc/ folder")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per provider and case")
    parser.add_argument("--out", default="bench/results/kernels-1thread-cpu.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = kernels.load_baseline(args.baseline_csrc)
    rows = []
    for shape_name in ("edsr", "rcan"):
        shape = kernels.SHAPES[shape_name]
        for distance in kernels.DISTANCES:
            for dtype_name, dtype in kernels.DTYPES.items():
                generator = torch.Generator().manual_seed(0)
                student = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
                teacher = torch.randn(shape, generator=generator).to(dtype)
                providers = {name: kernels.loss_function(name, distance, baseline)
                             for name in ("fused", kernels.BASELINE, "fitnet")}

                def step(loss_fn):
                    loss_fn(student, teacher).backward()
                    student.grad = None

                times = {name: [] for name in providers}
                for loss_fn in providers.values():
                    step(loss_fn)  # warm up
                for _ in range(args.reps):
                    for name, loss_fn in providers.items():
                        start = time.thread_time()
                        step(loss_fn)
                        times[name].append((time.thread_time() - start) * 1e3)
                for name, values in times.items():
                    rows.append(dict(shape="x".join(map(str, shape)), distance=distance, dtype=dtype_name,
                                     provider=name, cpu_ms_1thread=f"{statistics.median(values):.2f}"))
                    print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
