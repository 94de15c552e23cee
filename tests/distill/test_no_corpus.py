"""Distillation on a machine without the Debian corpus: a clear error, or --text-file end to end."""
import json
import os
import subprocess
import sys

import pytest

from dsla_model.layer_store import LayerStore

TEXT = "/usr/share/common-licenses/GPL-3"  # Debian's base-files: real English on every Debian machine
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _distill(tmp_path, model_dir, *extra):
    env = dict(os.environ, DSLA_CORPUS_ROOT=str(tmp_path / "no-corpus"), DSLA_SERVE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "deploy.cli", "distill", "--model", model_dir, "--store", str(tmp_path / "store"),
           "--layers", "1", "--tokens-per-layer", "1024", "--kl-steps", "0", "--threads", "1", "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_missing_corpus_is_a_clear_error(tiny_model_dir, tmp_path):
    r = _distill(tmp_path, tiny_model_dir)
    assert r.returncode == 2, r.stderr
    assert "python3.11-doc" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists(TEXT), reason="needs Debian's base-files")
def test_text_file_replaces_the_corpus_for_order_and_training(tiny_model_dir, tmp_path):
    r = _distill(tmp_path, tiny_model_dir, "--text-file", TEXT, "--train-blocks", "4")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["published"] == LayerStore(tmp_path / "store").published_layers()
    m = LayerStore(tmp_path / "store").read_manifest()
    assert len(m["layers"]) == 1 and sorted(m["order"]) == [0, 1, 2]
    cached = list((tmp_path / "cache" / "order").glob("*-damage-*.json"))
    assert len(cached) == 1 and "corpus" not in cached[0].name
    assert json.loads(cached[0].read_text())["order"] == m["order"]


@pytest.mark.skipif(not os.path.exists(TEXT), reason="needs Debian's base-files")
def test_block_len_sets_the_training_blocks_length(tiny_model_dir, tmp_path):
    """--block-len: the layer trains on blocks of that many tokens (its manifest entry says so and
    the token count is a whole number of them); a length below 16 is refused before any work."""
    r = _distill(tmp_path, tiny_model_dir, "--text-file", TEXT, "--train-blocks", "3", "--block-len", "96",
                 "--order", "reverse")
    assert r.returncode == 0, r.stderr
    entry = next(iter(LayerStore(tmp_path / "store").read_manifest()["layers"].values()))
    assert entry["metrics"]["config"]["block_size"] == 96 and entry["metrics"]["tokens"] % 96 == 0
    r = _distill(tmp_path, tiny_model_dir, "--block-len", "8")
    assert r.returncode == 2 and "--block-len must be >= 16" in r.stderr and "Traceback" not in r.stderr
    r = _distill(tmp_path, tiny_model_dir, "--block-len", "100000", "--text-file", TEXT)
    assert r.returncode == 2 and "exceed the model's" in r.stderr and "Traceback" not in r.stderr


def test_generate_conversion_without_the_corpus_is_a_clear_error(tiny_model_dir, tmp_path):
    env = dict(os.environ, DSLA_CORPUS_ROOT=str(tmp_path / "no-corpus"), DSLA_SERVE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "deploy.cli", "generate", "--model", tiny_model_dir, "--prompt", "hi",
           "--conversion", "0.5", "--max-tokens", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "sensitivity order" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_distillation_needs_a_held_out_block(tiny_model_dir, tmp_path):
    """Each layer is judged on a block it never trained on: one training block is refused up front,
    and so is a text file that holds a single block."""
    r = _distill(tmp_path, tiny_model_dir, "--train-blocks", "1")
    assert r.returncode == 2 and "--train-blocks must be >= 2" in r.stderr and "Traceback" not in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("A few words, fewer than two blocks of tokens. " * 80)  # 881 tokens: one block of 480
    order = tmp_path / "order.json"
    order.write_text('{"order": [2, 1, 0]}')  # an explicit order: no damage pass over the short text
    r = _distill(tmp_path, tiny_model_dir, "--text-file", str(short), "--block-len", "480", "--order", str(order))
    assert r.returncode == 2 and "at least 2" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_eval_without_the_corpus_is_a_clear_error(tmp_path):
    """eval did not catch CorpusMissingError (a RuntimeError): a traceback, exit 1."""
    from tests.conftest import skip_without_default_model

    skip_without_default_model()
    env = dict(os.environ, DSLA_CORPUS_ROOT=str(tmp_path / "no-corpus"))
    cmd = [sys.executable, "-m", "deploy.cli", "eval", "--blocks", "1", "--conversion", "0.1", "--out-dir", "",
           "--json"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--text-file" in r.stderr and "Traceback" not in r.stderr, r.stderr
