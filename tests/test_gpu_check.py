"""The device script's CPU dry run (scripts/gpu_check.py --device cpu): every check a GPU
session would run, on the CPU, so the script is known to work before a device is lent."""
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def test_gpu_check_dry_run_passes(tmp_path):
    # The gradient check runs the test binary `cargo test --release` builds (make test builds
    # it before the Python tests; pytest alone on a fresh checkout has none).
    if gpu_check.mixed_precision_binary() is None:
        pytest.skip("no mixed_precision test binary: run cargo test --release (make test) first")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--no-bench",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    report = (tmp_path / "gpu-check.md").read_text() if (tmp_path / "gpu-check.md").exists() else ""
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "All checks passed." in report
    # Every section wrote its figures: parity rows for the five architectures in both dtypes,
    # the gradient comparison, and the distillation run with and without checkpointing.
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gpt2"):
        assert f"| {arch} | f32 |" in report and f"| {arch} | bf16 |" in report
    assert "* bf16 lm_head.weight: cosine" in report and "* f16 lm_head.weight: cosine" in report
    assert "With --gradient-checkpointing:" in report
