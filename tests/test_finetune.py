"""Fine-tuning (``--init-from``): the weight remapping by character, the refusals, a run on a corpus
with new characters (resumed, exported, generating them), and the Ray job's worker config. The
comparison with training from scratch is in test_train.py (it trains longer)."""

import json

import numpy as np
import pytest
from conftest import last_json, run_cli

from textgen.checkpoint import load_checkpoint, save_checkpoint
from textgen.config import NOTEBOOK, ModelConfig, TrainConfig, preset
from textgen.text import Vocab, load_corpus

SMALL = preset("small").model  # embedding 16, LSTM 32


def _random_weights(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])


def _save(path, cfg: ModelConfig, vocab: Vocab, lowercase=True):
    """A checkpoint of an untrained model (random weights), as training writes one."""
    from textgen.model import build_model

    model = build_model(cfg, vocab.size)
    _random_weights(model, 1)
    state = {"epoch": 1, "step": 0, "best_val_loss": 3.0, "best_epoch": 1, "bad_epochs": 0, "seed": 0, "history": []}
    return save_checkpoint(path, model, None, cfg, TrainConfig(lowercase=lowercase), vocab, {"val_loss": 3.0}, state)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A training output directory (its best/ and last/) of the small shape, on the bundled corpus' vocabulary."""
    out = tmp_path_factory.mktemp("base") / "run"
    vocab = Vocab.from_text(load_corpus().text)
    for name in ("best", "last"):
        _save(out / name, SMALL, vocab)
    return out


def test_remap_copies_the_rows_of_known_characters_and_keeps_fresh_ones_for_new():
    import keras

    from textgen.finetune import init_weights
    from textgen.model import build_model

    old, new = Vocab(("a", "c", "e")), Vocab(("a", "b", "c", "e", "f"))  # b, f new; the rows move
    cfg = ModelConfig(embedding_dim=4, lstm_units=(3,), dropout=0.0, seq_len=4)
    src = build_model(cfg, old.size)
    _random_weights(src, 7)  # a non-zero bias too, so a copied one shows
    source = {layer.name: layer.get_weights() for layer in src.layers if layer.weights}
    keras.utils.set_random_seed(0)
    dst = build_model(cfg, new.size)
    fresh = {layer.name: layer.get_weights() for layer in dst.layers if layer.weights}
    init_weights(dst, source, old, new)

    emb = dst.get_layer("embedding").get_weights()[0]
    kernel, bias = dst.get_layer("logits").get_weights()
    for i, c in enumerate(old.chars):
        j = new.index[c]
        np.testing.assert_array_equal(emb[j], source["embedding"][0][i])
        np.testing.assert_array_equal(kernel[:, j], source["logits"][0][:, i])
        assert bias[j] == source["logits"][1][i]
    for c in ("b", "f"):  # Keras' initializers of the new model: uniform embedding, Glorot kernel, zero bias
        j = new.index[c]
        np.testing.assert_array_equal(emb[j], fresh["embedding"][0][j])
        np.testing.assert_array_equal(kernel[:, j], fresh["logits"][0][:, j])
        assert bias[j] == 0.0 and np.abs(emb[j]).sum() > 0
    for w, s in zip(dst.get_layer("lstm_0").get_weights(), source["lstm_0"]):
        np.testing.assert_array_equal(w, s)
    # The same model: on text of the old characters it gives the old logits, in the new places.
    text = "aceeca"
    before = np.asarray(src(old.encode(text)[None]))
    after = np.asarray(dst(new.encode(text)[None]))
    np.testing.assert_allclose(after[..., [new.index[c] for c in old.chars]], before, rtol=1e-6, atol=1e-6)


def test_source_weights_are_read_from_a_checkpoint_with_its_checks(tmp_path):
    from textgen.finetune import source_weights

    vocab = Vocab(tuple("abcd"))
    ckpt = load_checkpoint(_save(tmp_path / "c", SMALL, vocab))
    weights = source_weights(ckpt)
    assert sorted(weights) == ["embedding", "logits", "lstm_0"]
    assert weights["embedding"][0].shape == (4, SMALL.embedding_dim) and weights["logits"][1].shape == (4,)


def _train(tmp_path, *extra):
    return run_cli(["train", "--preset", "small", "--out", str(tmp_path / "new"), "--no-progress", "--epochs", "1",
                    *extra])


def test_refusals_exit_2_with_a_message_and_write_nothing(base, tmp_path):
    notebook = _save(tmp_path / "nb", ModelConfig(kind=NOTEBOOK, lstm_units=(8,), seq_len=8), Vocab(tuple("ab")))
    cases = [
        (["--init-from", str(base), "--resume"], "pass one of them"),
        (["--init-from", str(base), "--lstm-units", "64"], "--lstm-units 64 (the checkpoint's are 32)"),
        (["--init-from", str(base), "--embedding-dim", "8"], "--embedding-dim 8 (the checkpoint's is 16)"),
        (["--init-from", str(base), "--preset", "notebook-1x256"], "a preset of the notebook kind"),
        (["--init-from", str(base), "--no-lowercase"], "--no-lowercase (the checkpoint was trained on lowercased"),
        (["--init-from", str(tmp_path / "missing")], "is not a checkpoint"),
        (["--init-from", "s3://bucket/run/best"], "a URI is not supported"),
        (["--init-from", str(notebook)], "the notebook kind"),
    ]
    for extra, message in cases:
        code, _, stderr = _train(tmp_path, *extra)
        assert code == 2 and message in stderr and "Traceback" not in stderr, (extra, stderr)
        assert not (tmp_path / "new").exists()


def test_a_prepared_dataset_must_hold_the_checkpoints_characters(base, tmp_path):
    corpus = tmp_path / "b.txt"
    corpus.write_text("only a few letters here. " * 200, encoding="utf-8")
    code, _, stderr = run_cli(["prepare", str(corpus), "--out", str(tmp_path / "ds"), "--no-progress"])
    assert code == 0, stderr
    code, _, stderr = _train(tmp_path, "--init-from", str(base), "--data", str(tmp_path / "ds"))
    assert code == 2 and "lacks 31 of the checkpoint's characters" in stderr and "--vocab-from" in stderr, stderr
    code, stdout, stderr = run_cli(["prepare", str(corpus), "--out", str(tmp_path / "ds2"), "--no-progress",
                                    "--vocab-from", str(base)])
    assert code == 0 and last_json(stdout)["vocab_size"] == 45, stderr
    code, _, stderr = run_cli(["prepare", str(corpus), "--out", str(tmp_path / "ds3"), "--no-progress",
                               "--vocab-from", str(base), "--no-lowercase"])
    assert code == 2 and "lowercased" in stderr, stderr


@pytest.mark.slow
def test_new_characters_are_learned_resumed_exported_and_generated(base, tmp_path):
    corpus = tmp_path / "b.txt"
    corpus.write_text("the café {menu} is open, said the hatter. " * 100, encoding="utf-8")
    args = ["train", "--preset", "small", "--out", str(tmp_path / "ft"), "--no-progress", "--corpus", str(corpus)]
    code, stdout, stderr = run_cli(args + ["--epochs", "1", "--init-from", str(base)])
    assert code == 0, stderr
    assert "fine-tuning from" in stderr and "vocabulary 45 -> 48, 3 new characters: '{', '}', 'é'" in stderr
    assert last_json(stdout)["init_from"] == str((base / "best").resolve())
    ckpt = load_checkpoint(tmp_path / "ft" / "best")
    base_vocab = load_checkpoint(base / "best").vocab
    assert ckpt.vocab.chars == tuple(sorted(set(base_vocab.chars) | {"{", "}", "é"}))  # "z", "?"... kept
    assert ckpt.state["init_from"] == {"checkpoint": str((base / "best").resolve()), "vocab": list(base_vocab.chars)}
    assert ckpt.model.lstm_units == SMALL.lstm_units and ckpt.epoch == 1 and ckpt.state["history"][0]["epoch"] == 1

    code, _, stderr = run_cli(args + ["--epochs", "2", "--resume"])  # prepared with the same base vocabulary
    assert code == 0 and "resumed from" in stderr, stderr
    assert load_checkpoint(tmp_path / "ft" / "last").vocab == ckpt.vocab
    assert load_checkpoint(tmp_path / "ft" / "last").state["init_from"] == ckpt.state["init_from"]

    onnx = tmp_path / "ft.onnx"
    code, _, stderr = run_cli(["export", str(tmp_path / "ft"), "--out", str(onnx)])
    assert code == 0, stderr
    code, stdout, stderr = run_cli(["generate", str(onnx), "--prompt", "the café {", "--max-chars", "20",
                                    "--seed", "1"])
    assert code == 0 and "Traceback" not in stderr, stderr  # the new characters are in the exported vocabulary


def test_ray_workers_get_the_checkpoint_as_an_absolute_path_and_its_architecture(base, tmp_path, monkeypatch):
    from jobs.train import build_parser, check_args, loop_config

    monkeypatch.chdir(base.parent)
    args = build_parser().parse_args(["--init-from", base.name, "--storage-path", str(tmp_path / "ray")])
    config = loop_config(args)
    assert config["init_from"] == str((base / "best").resolve())
    assert config["model"]["lstm_units"] == [32] and config["model"]["embedding_dim"] == 16  # not the preset's
    assert json.loads(json.dumps(config)) == config
    assert loop_config(build_parser().parse_args([]))["init_from"] is None
    from textgen.errors import TextgenError

    with pytest.raises(TextgenError, match="a URI is not supported"):
        check_args(build_parser().parse_args(["--init-from", "gs://b/ckpt", "--storage-path", str(tmp_path / "ray")]))
