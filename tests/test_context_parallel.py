"""Context parallelism (msa.distributed) equals one process: torchrun over gloo, float64, 1 to 4 ranks.

Each case launches ``tests/cp_worker.py`` on N processes; every rank checks
its shard's outputs, selection, KL loss and the gradients of all inputs
against the whole sequences run in one process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def launch(n_ranks: int, attention: str, layout: str, report_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}",
               str(TESTS / "cp_worker.py"), attention, layout, str(report_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("attention", ["reference"])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4])
def test_context_parallel_equals_one_process(n_ranks, attention, layout, tmp_path):
    result = launch(n_ranks, attention, layout, tmp_path)
    reports = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert result.returncode == 0 and len(reports) == n_ranks, "\n".join(reports) + result.stderr[-3000:]
    assert all(report.endswith(": equal") for report in reports), "\n".join(reports)
