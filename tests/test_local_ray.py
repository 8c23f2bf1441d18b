"""`python -m jobs.train` with no --address and no RAY_ADDRESS starts a Ray of its own: it never
joins the cluster Ray has on record in its temp directory (someone else's, or a dead one that
`ray.init()` would retry for minutes). The same job also carries an ``--init-from`` (fine-tuning):
the worker loads the checkpoint the driver resolved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_recorded_dead_cluster_is_not_joined(tmp_path, small_run):
    # Ray reads $TMPDIR/ray/ray_current_cluster; a short private TMPDIR keeps its socket paths short.
    tmpdir = Path(tempfile.mkdtemp(prefix="tg-rec-", dir="/tmp"))
    try:
        (tmpdir / "ray").mkdir()
        (tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:6391\n")  # nothing listens there
        env = {**os.environ, "TMPDIR": str(tmpdir), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.train", "--preset", "small", "--epochs", "1", "--num-workers", "1",
             "--storage-path", str(tmp_path / "runs"), "--name", "own-ray", "--init-from", str(small_run)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Connecting to existing Ray cluster" not in output
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 1
    assert f"fine-tuning from {small_run / 'best'}" in output and "no new characters" in output
    state = json.loads((Path(result["best_checkpoint"]) / "state.json").read_text())
    assert state["init_from"]["checkpoint"] == str((small_run / "best").resolve())
