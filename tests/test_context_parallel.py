"""Context parallelism (msa.distributed) equals one process: torchrun over gloo, float64, 1 to 4 ranks.

Each case launches ``tests/cp_worker.py`` on N processes; every rank checks
its shard's outputs, selection, KL loss and the gradients of all inputs
against the whole sequences run in one process: with the reference, with
the public ops (sparse, and dense as in the indexer warm-up) and through
``MSAAttention(context_parallel_group=...)``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def launch(n_ranks: int, check: str, layout: str, report_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_ranks}",
               str(TESTS / "cp_worker.py"), check, layout, str(report_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


# (ranks, check, layout): the reference on every rank count and layout, the ops and the module on a spread
CASES = [(n, "reference", layout) for n in (1, 2, 3, 4) for layout in ("batched", "packed")]
CASES += [(2, "ops", "batched"), (3, "ops", "packed"), (4, "ops", "packed"), (2, "ops-dense", "packed"),
          (3, "ops-dense", "batched"), (3, "module", "batched"), (4, "module", "packed")]


@pytest.mark.parametrize(("n_ranks", "check", "layout"), [(2, "ops", "packed")] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in CASES])
def test_context_parallel_equals_one_process(n_ranks, check, layout, tmp_path):
    result = launch(n_ranks, check, layout, tmp_path)
    reports = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert result.returncode == 0 and len(reports) == n_ranks, "\n".join(reports) + result.stderr[-3000:]
    assert all(report.endswith(": equal") for report in reports), "\n".join(reports)
