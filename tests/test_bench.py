import re

import pytest

from ext import bench


@pytest.mark.slow
def test_bench_runs_every_stage_on_the_cpu(capsys):
    """A smoke test of ext/bench.py at toy sizes (no figure here means anything; the GPU run fills the README)."""
    lines = bench.main(["--device", "cpu", "--presets", "tiny", "--train-steps", "2", "--train-batch", "8",
                        "--sample-batch", "4", "--sample-steps", "2", "--feature-images", "4"])
    assert lines[0].startswith("cpu | torch ") and [l.split()[0] for l in lines[1:]] == ["train", "sample", "FID"]
    assert "batch 8:" in lines[1]
    for line, parts in zip(lines[1:], (3, 2, 2)):  # images/s of fast, eager, DDP world 1
        rates = [float(v) for v in re.findall(r"([\d.]+) images/s", line)]
        assert len(rates) == parts and all(r > 0 for r in rates), line
    assert "overhead" in lines[1] and lines[-1] in capsys.readouterr().out


def test_bench_mode_prints_figures_and_writes_nothing(shapes, tmp_path, capsys):
    r = bench.time_training(["--data", f"{shapes}/train", "--out", str(tmp_path / "b"), "--preset", "tiny",
                             "--batch-size", "8"], 3)
    assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["gflop_per_image"] > 0 and r["mfu"] is None  # CPU
    assert "images/s" in capsys.readouterr().out and not (tmp_path / "b").exists()
