import re

from ext import bench


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
