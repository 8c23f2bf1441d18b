"""Shared fixtures: a tiny model trained once per session, and its ONNX export.

Training the ``small`` preset for two epochs on the bundled corpus takes ~15 s on 2 cores; every
test that needs a real checkpoint or ONNX file shares this one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Corpora prepared for training go to a cache of the test session's own (inherited by every
# subprocess and Ray worker it starts), not the user's ~/.cache/textgen; removed at the end.
_OWN_CACHE = "TEXTGEN_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["TEXTGEN_CACHE"] = tempfile.mkdtemp(prefix="textgen-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["TEXTGEN_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``textgen`` in this process; returns (exit code, stdout, stderr)."""
    from textgen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_events(logdir: Path) -> dict[tuple[str, int], object]:
    """{(tag, step): value} of every event file under ``logdir`` (float scalars, str texts)."""
    import tensorflow as tf

    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                plugin = v.metadata.plugin_data.plugin_name
                assert plugin in ("scalars", "text"), v.tag
                value = tf.make_ndarray(v.tensor)
                found[(v.tag, event.step)] = value.item().decode() if plugin == "text" else float(value)
    return found


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """Output directory of ``textgen train --preset small --epochs 2`` on the bundled corpus."""
    out = tmp_path_factory.mktemp("small_run") / "run"
    code, stdout, stderr = run_cli(
        ["train", "--preset", "small", "--epochs", "2", "--out", str(out), "--no-progress"]
    )
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def small_onnx(small_run, tmp_path_factory) -> Path:
    """The small run's best checkpoint exported to ONNX."""
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    code, stdout, stderr = run_cli(["export", str(small_run), "--out", str(path)])
    assert code == 0, stderr
    return path
