"""recipes/bench/gpu_check.py --dry: every step of the GPU proof runs here, on the CPU, with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "bench"


def test_gpu_check_dry_run_exercises_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "gpu_check.py", "--dry", "--out", str(out)], cwd=BENCH,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) == {"environment", "parity", "throughput", "resume", "cli", "seconds"}
    rows = [report["environment"], *(row for key in ("parity", "throughput", "resume", "cli") for row in report[key])]
    assert not [row for row in rows if "error" in row]  # a failed step is recorded, not raised: none may fail here
    assert [row["precision"] for row in report["parity"]] == ["fp32", "bf16"] and all(r["ok"] for r in report["parity"])
    assert len(report["throughput"]) == 5 and all(row["tokens/s"] > 0 for row in report["throughput"])
    assert report["throughput"][-1]["model"] == "transformer compiled"
    assert all(row["bitwise equal"] for row in report["resume"])  # the CPU is deterministic either way
    assert [(row["search"], row["precision"]) for row in report["cli"]] == [
        ("greedy", "bf16"), ("greedy", "fp32"), ("beam 5", "bf16"), ("beam 5", "fp32")]
    assert report["cli"][1]["same as CPU fp32"] == "100.0%"  # on the CPU, fp32 against itself
