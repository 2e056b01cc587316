"""The benchmark scripts keep working (tiny sizes: the figures themselves come from full runs, docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_benchmark_smoke_run_writes_its_report(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--skip-server",
                          "--repeats", "1", "--output-dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert json.loads((tmp_path / "smoke.json").read_text()) == report
    assert (tmp_path / "loss_vs_time-smoke.png").stat().st_size > 10_000
    seed_run = report["time_to_seed_loss"]
    assert seed_run["auto"]["reached"] and seed_run["auto"]["final_loss"] <= seed_run["seed_loss"]
    assert {"speedup_to_seed_loss", "per_iteration_ratio"} <= set(report["summary"])


def test_gpu_check_runs_on_the_cpu(tmp_path):
    output = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "32",
                          "--steps", "2", "--batch-size", "32", "--max-batch", "2", "--repeats", "1",
                          "--memory-sizes", "32", "--default-steps", "4", "--localized-sizes", "64",
                          "--overhead-size", "64", "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    assert report["fp32"]["iterations"] == 2 and set(report["batching"]) == {"1", "2"}
    assert report["default_request"]["iterations"] == 4
    assert report["memory_model"]["32"]["fp32"]["estimated_mib"] > 0
    assert report["fp32_tf32_flags"] == {"forward": [[False, False]], "backward": [[False, False]]}
    localized = report["localized"]["64"]  # the host's memory fits full passes; by tiles, one tile is all of it
    assert localized["fp32_auto"]["tile"] is None and localized["fp32_localized"]["tile"] >= 64
    assert localized["fp32_localized"]["estimated_mib"] > 0
    assert report["localized_overhead"]["tile"] == 48 and report["localized_overhead"]["ratio"] > 0  # 2 tiles
    assert abs(report["fast_loss_vs_fp32"]) < 0.5
    assert "TFLOP/s" in run.stdout
    fp32 = report["fp32"]  # 2 iterations at 32x24 px (the 4:3 sample), 2 FLOP per multiply-add, forward + backward
    assert fp32["effective_tflops"] * 1e12 * fp32["seconds"] == pytest.approx(2 * 2 * 3.6e5 * 32 * 24 * 2)


def test_gpu_check_counts_each_scale_at_its_own_size(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_check import _pixel_iterations

    # reports every 10 iterations and at the last one of each scale: 15 iterations at 100 px, 20 at 400 px
    assert _pixel_iterations([(10, 100), (15, 100), (25, 400), (35, 400)]) == 15 * 100 + 20 * 400


def test_the_coarse_to_fine_start_benchmark_runs(tmp_path):
    output = tmp_path / "starts.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coarse_to_fine_start.py"), "--sizes", "64",
                          "--seconds", "0.5", "--repeats", "1", "--inits", "noise", "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    assert {row["start"] for row in report["runs"]} == {"upsampled", "carried", "lower"}
    assert all(row["final_loss"] > 0 and row["init"] == "noise" for row in report["runs"])


def test_the_fixed_work_benchmark_runs(tmp_path):
    output = tmp_path / "fixed.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fixed_work.py"), "--sizes", "64", "--repeats", "1",
                          "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(output.read_text())
    assert report["machine"]["cpu"] and "native_bf16_flags" in report["machine"]
    assert [(case["size"], case["schedule"]) for case in report["cases"]] == [(64, "one_scale"), (64, "coarse_to_fine")]
    for case in report["cases"]:
        assert case["fixed_seconds"] > 0 and case["iteration_seconds"] > 0 and case["model"]["fixed_seconds"] > 0
        assert any(stage.startswith("style_engine.style_targets") for stage in case["stages"])


def test_fixed_work_counts_iterations_between_sparse_reports(monkeypatch):
    """A GPU reports progress every few iterations and at a scale's last: each gap counts its iterations; the
    iterations' seconds are the gaps as timed, and before a scale's first report its time per iteration."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from fixed_work import iteration_times

    coarse, fine = (48, 64), (96, 128)  # 0.1 s an iteration at the coarse scale, 0.4 s at the fine one
    stamps = {coarse: [(10, 2.0), (20, 3.0), (21, 3.1)], fine: [(31, 7.1), (41, 11.1), (42, 11.5), (43, 12.5)]}
    iteration, iterating = iteration_times(stamps)
    assert iteration == pytest.approx({coarse: 0.1, fine: 0.4})
    # before each scale's first report, its iterations since the last scale's last: 10 at each
    assert iterating == pytest.approx({coarse: 10 * 0.1 + 1.1, fine: 10 * 0.4 + 5.4})


def test_the_localized_benchmark_runs(tmp_path):
    output = tmp_path / "localized.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "localized.py"), "--sizes", "128", "--tiles", "64",
                          "--repeats", "1", "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(output.read_text())["sizes"]["128"]
    localized, = result["localized"]
    assert localized["tiles"] == 4 and result["full"]["seconds"] > 0 and localized["peak_mib"] > 0
