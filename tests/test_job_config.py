"""The Ray job's configuration, checked without starting Ray: GPU requests, mixed precision,
batch sharding and the worker loop's settings (GPU paths cannot run on this machine)."""

import pytest

from jobs.train import build_parser, check_args, loop_config, replicas_per_worker, scaling_config
from textgen.errors import TextgenError


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_gpu_workers_request_gpus_and_mirror_over_them(tmp_path):
    args = _args("--use-gpu", "--gpus-per-worker", "4", "--num-workers", "2", "--cpus-per-worker", "8",
                 "--batch-size", "1024", "--storage-path", str(tmp_path))
    check_args(args)  # 1024 divides by 2 workers x 4 GPUs
    sc = scaling_config(args)
    assert sc.use_gpu and sc.num_workers == 2
    assert sc.resources_per_worker == {"CPU": 8, "GPU": 4}
    assert replicas_per_worker(args) == 4
    assert loop_config(args)["threads"] == 8


def test_gpu_defaults_to_one_per_worker_and_cpu_jobs_request_none(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: one CPU per worker unless told
    assert scaling_config(_args("--use-gpu")).resources_per_worker == {"CPU": 1, "GPU": 1}
    cpu = scaling_config(_args("--num-workers", "3"))
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1}


def test_on_a_local_ray_one_worker_gets_every_core_by_default(monkeypatch):
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = len(os.sched_getaffinity(0))
    one = _args()
    assert one.num_workers == 1 and scaling_config(one).resources_per_worker == {"CPU": cores}
    assert loop_config(one)["threads"] == cores
    assert scaling_config(_args("--num-workers", "2")).resources_per_worker == {"CPU": max(1, cores // 2)}
    assert scaling_config(_args("--cpus-per-worker", "1")).resources_per_worker == {"CPU": 1}
    assert scaling_config(_args("--address", "auto")).resources_per_worker == {"CPU": 1}


def test_global_batch_must_divide_by_every_replica(tmp_path):
    args = _args("--use-gpu", "--gpus-per-worker", "4", "--num-workers", "2", "--batch-size", "100",
                 "--storage-path", str(tmp_path))
    with pytest.raises(TextgenError, match="not divisible by 8 replicas"):
        check_args(args)


def test_mixed_precision_reaches_the_workers_config():
    from textgen.config import train_config_from_dict

    cfg = loop_config(_args("--use-gpu", "--mixed-precision"))
    assert train_config_from_dict(cfg["train"]).mixed_precision is True
    assert train_config_from_dict(loop_config(_args())["train"]).mixed_precision is False


def test_mixed_precision_training_config_keeps_cudnn_and_float32_logits():
    import keras

    from textgen.config import TrainConfig, preset
    from textgen.model import build_model, cudnn_problems, lstm_layers
    from textgen.train import make_optimizer

    model = build_model(preset("default").model, 45, mixed_precision=True)
    assert all(not cudnn_problems(layer) for layer in lstm_layers(model))
    assert {layer.compute_dtype for layer in lstm_layers(model)} == {"float16"}
    assert model.get_layer("logits").compute_dtype == "float32"
    opt = make_optimizer(TrainConfig(mixed_precision=True), num_replicas=8)
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert opt.inner_optimizer.global_clipnorm == pytest.approx(5.0 / 8)  # clipnorm shared by replicas


def test_workers_get_the_data_location_absolute_and_uris_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loop_config(_args("--data", "prepared"))["data"] == str(tmp_path / "prepared")
    assert loop_config(_args("--data", "s3://bucket/data/corpus"))["data"] == "s3://bucket/data/corpus"
    config = loop_config(_args("--corpus", "a.txt", "--max-vocab", "100", "--min-count", "2"))
    assert config["data"] is None and (config["max_vocab"], config["min_count"]) == (100, 2)


def test_the_driver_checks_a_uri_by_its_dataset_json_only(tmp_path, monkeypatch):
    from textgen.dataset import DatasetError, check_location
    from textgen.prepare import PrepareOptions, prepare

    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    out, _ = prepare(None, tmp_path / "ds", progress=False)
    check_location(f"file://{out}", None, PrepareOptions())
    fetched = next((tmp_path / "cache" / "remote").iterdir())
    assert sorted(p.name for p in fetched.iterdir()) == ["dataset.json"]  # no shard copied on the driver
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        check_location(f"file://{tmp_path}/missing", None, PrepareOptions())
