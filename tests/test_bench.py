"""The kernel benchmark's machinery at a tiny shape: every provider, both distances, the floor, the pause."""
import csv
import subprocess
import time

from facd_fast.bench import kernels


def test_tiny_run_writes_every_provider_distance_and_the_floor(monkeypatch, tmp_path):
    monkeypatch.setitem(kernels.SHAPES, "tiny", (3, 8, 4, 5))
    providers = ["eager", "fused", "fitnet"]
    rows = kernels.run(shapes=["tiny"], dtypes=["float32"], providers=providers, out_dir=str(tmp_path),
                       device="cpu", min_reps=1, max_reps=1, budget_s=0.0)
    assert len(rows) == 2 * 2 * len(providers)  # modes x distances x providers
    written = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert {(r["mode"], r["distance"], r["provider"]) for r in written} == {
        (m, d, p) for m in kernels.MODES for d in kernels.DISTANCES for p in providers}
    assert all(float(r["p50"]) > 0 and float(r["floor"]) > 0 for r in written)
    assert all(r["kept_mem"] != "" for r in written if r["mode"] == "forward+backward")
    assert (tmp_path / "kernels-forward_backward.png").exists()


def test_pause_stops_and_resumes_the_matching_processes():
    sleeper = subprocess.Popen(["sleep", "31.4159"])
    try:
        with kernels.paused("^sleep 31.4159$"):
            time.sleep(0.2)
            with open(f"/proc/{sleeper.pid}/stat") as stat:
                assert stat.read().rsplit(")", 1)[1].split()[0] == "T"  # stopped
        time.sleep(0.2)
        with open(f"/proc/{sleeper.pid}/stat") as stat:
            assert stat.read().rsplit(")", 1)[1].split()[0] == "S"  # running (sleeping) again
    finally:
        sleeper.kill()
        sleeper.wait()
