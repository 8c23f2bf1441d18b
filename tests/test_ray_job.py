"""The Ray Train job on a real local Ray: two CPU workers, failures, resume, ``ray job submit``.

Each test starts its own Ray (a local one in the job's process, or a ``ray start`` head) and trains
the small preset on a 40k-character corpus, so one test takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_events

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",  # token auth (on once ray.init made a token) breaks `ray job submit`
        TF_CPP_MIN_LOG_LEVEL="2",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "alice-40k.txt"
    text = (REPO / "textgen" / "data" / "alice_in_wonderland.txt").read_text(encoding="utf-8")
    path.write_text(text[:40_000], encoding="utf-8")
    return path


def _job_args(corpus: Path, storage: Path, name: str, epochs: int, *extra: str) -> list[str]:
    return [
        "--preset", "small", "--corpus", str(corpus), "--epochs", str(epochs), "--num-workers", "2",
        "--storage-path", str(storage), "--name", name, *extra,
    ]


def _run_job(args: list[str], env=None, timeout=420, module="jobs.train") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env or _env(),
        capture_output=True, text=True, timeout=timeout,
    )


FAULTY_JOB = "tests.faulty_job"  # jobs.train with the faults the TEXTGEN_FAULT_* variables ask for


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _history(checkpoint: str | Path) -> list[dict]:
    return json.loads((Path(checkpoint) / "state.json").read_text())["history"]


def _check_final_checkpoint(result: dict, epochs: int) -> list[dict]:
    from textgen.checkpoint import load_checkpoint, load_model

    ckpt = load_checkpoint(result["best_checkpoint"])
    load_model(ckpt)  # complete and loadable
    history = _history(result["best_checkpoint"])
    assert result["epochs"] == epochs
    assert [m["epoch"] for m in history] == list(range(1, len(history) + 1))
    assert result["best_val_loss"] == min(m["val_loss"] for m in history)
    return history


def test_bad_configuration_fails_fast_with_a_message(corpus, tmp_path):
    cases = [
        (["--num-workers", "0"], "--num-workers must be at least 1"),
        (["--batch-size", "33"], "not divisible by 2 replicas"),
        (["--storage-path", "/proc/textgen-storage"], "not writable"),
        (["--corpus", str(tmp_path / "missing.txt")], "does not exist"),
        (["--gpus-per-worker", "1"], "needs --use-gpu"),
    ]
    for extra, message in cases:
        start = time.monotonic()
        args = _job_args(corpus, tmp_path / "runs", "bad", 1) + extra
        proc = _run_job(args, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
        assert time.monotonic() - start < 60  # fails before any cluster work


def test_corpus_missing_on_a_worker_fails_with_a_message_not_a_hang(corpus, tmp_path):
    # The driver sees the corpus; rank 1 looks for it where it is not (a node without the file).
    start = time.monotonic()
    args = _job_args(corpus, tmp_path / "runs", "hidden", 2, "--max-failures", "1")
    proc = _run_job(args, env=_env(TEXTGEN_FAULT_HIDE_CORPUS_RANK="1"), timeout=300, module=FAULTY_JOB)
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: training failed: ")]
    assert len(said) == 1, proc.stderr[-3000:]  # Ray's own log lines may follow it
    assert "worker rank 1 on node" in said[0] and "not-on-this-node does not exist" in said[0], said
    assert "every worker reads the corpus itself" in said[0], said
    assert time.monotonic() - start < 240


def test_worker_failure_recovers_from_the_last_checkpoint(corpus, tmp_path):
    marker = tmp_path / "fault-marker"
    env = _env(TEXTGEN_FAULT_KILL_RANK="1@epoch=3", TEXTGEN_FAULT_MARKER=str(marker))
    # The whole bundled corpus: epochs of a few seconds, so the controller has registered epoch 1's
    # checkpoint before the kill (a worker dying right after a report can lose that one report).
    args = _job_args(corpus, tmp_path / "runs", "fault", 4, "--max-failures", "1")
    args.remove("--corpus")
    args.remove(str(corpus))
    proc = _run_job(args, env=env, module=FAULTY_JOB)
    result = _result(proc)
    assert marker.exists()  # rank 1 really was killed at the start of epoch 3
    output = proc.stdout + proc.stderr
    assert "resumed from" in output  # the epoch count continued, it did not restart from 0
    assert int(output.split("after epoch ")[1].split()[0]) in (1, 2)
    history = _check_final_checkpoint(result, 4)
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_driver_killed_mid_run_resumes_on_rerun(corpus, tmp_path):
    storage, name = tmp_path / "runs", "driver-kill"
    args = _job_args(corpus, storage, name, 6)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=_env(), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    snapshot = storage / name / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            # Wait until Ray has registered a checkpoint (not just written one), then kill.
            if snapshot.exists() and "checkpoint_" in snapshot.read_text(errors="replace"):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    time.sleep(2)
    proc = _run_job(args)
    result = _result(proc)
    output = proc.stdout + proc.stderr
    assert "resumed from" in output
    resumed_after = int(output.split("after epoch ")[1].split()[0])
    assert 1 <= resumed_after < 6
    _check_final_checkpoint(result, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real `ray start --head` on 127.0.0.1 with token auth and its own temp dir, stopped by its pid (``--block``
    keeps the launcher alive; SIGTERM to it stops every process it started), even when the test
    fails; not with the force flag of `ray stop`, which stops every Ray of the machine's user."""
    import secrets
    import shutil
    import tempfile
    import urllib.request

    env = _env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))  # as on a real cluster
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="tg-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(_free_port()),
         "--temp-dir", temp_dir, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, f"ray start --head exited with {head.returncode}"
            try:
                ask = urllib.request.Request(f"http://127.0.0.1:{dash}/api/version",
                                             headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
                urllib.request.urlopen(ask, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head's dashboard did not come up in 180 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_two_workers(ray_head, corpus, tmp_path):
    address, env = ray_head
    storage = tmp_path / "shared-storage"
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--", "python", "-m", "jobs.train", *_job_args(corpus, storage, "submitted", 3)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout.lower()
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith("{"))
    result = json.loads(line)
    assert result["num_workers"] == 2
    assert Path(result["best_checkpoint"]).is_relative_to(storage / "submitted")
    history = _check_final_checkpoint(result, 3)
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # validation loss falls
    # Both ranks hold identical weights after every epoch (gathered fingerprints agree exactly).
    assert all(m["replicas"] == 2 and m["replica_weight_spread"] == 0.0 for m in history)


def test_two_workers_train_on_a_prepared_dataset_from_a_uri(corpus, tmp_path):
    """`textgen prepare` once, then every worker fetches the shards from a file:// URI (as from
    s3://) into its own cache, checks them and trains with validation within epochs."""
    data = tmp_path / "prepared"
    prep = subprocess.run([sys.executable, "-m", "textgen", "prepare", str(corpus), "--out", str(data),
                           "--no-progress"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    args = _job_args(corpus, tmp_path / "runs", "from-uri", 2, "--eval-every-steps", "10")
    i = args.index("--corpus")
    args[i:i + 2] = ["--data", f"file://{data}"]
    proc = _run_job(args, env=_env(TEXTGEN_CACHE=str(tmp_path / "cache")))
    result = _result(proc)
    ckpt = Path(result["best_checkpoint"])
    history = _history(ckpt)
    assert result["epochs"] == 2 and any(m["partial"] for m in history) and not history[-1]["partial"]
    fetched = next((tmp_path / "cache" / "remote").iterdir())
    assert sorted(p.name for p in fetched.iterdir()) == ["dataset.json", "train-00000.bin", "val-00000.bin"]
    _check_samples_and_tensorboard(Path(result["run_path"]), history, proc.stdout + proc.stderr)


def _check_samples_and_tensorboard(run_path: Path, history: list[dict], output: str) -> None:
    """Rank 0 wrote a sample per evaluation and the TensorBoard events into Ray's run directory, and
    printed the samples once (no other rank did); Ray's reported metrics carry epoch_progress and the learning rate."""
    import ray.train

    samples = [json.loads(line) for line in (run_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step_in_epoch"]) for s in samples[:len(history)]] == [
        (m["epoch"], m["step_in_epoch"]) for m in history]
    assert samples[-1]["epoch"] == 2 and len(samples) == output.count("--- sample at temperature 0.5:")
    steps = [s["global_step"] for s in samples]
    assert steps == sorted(set(steps))
    assert len(list((run_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    events = read_events(run_path / "tensorboard")
    assert {step for _, step in events} == set(steps)
    assert [events[("val_loss", s["global_step"])] for s in samples[:len(history)]] == [
        pytest.approx(m["val_loss"], rel=1e-6) for m in history]
    reported = [m for _, m in ray.train.Result.from_path(str(run_path)).best_checkpoints]
    assert reported and all(0 < m["epoch_progress"] <= 2 for m in reported)
    assert all(m["learning_rate"] > 0 and m["val_bpc"] > 0 for m in reported)
