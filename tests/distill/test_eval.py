"""Evaluation fields, the passkey prompt, and the CLI's handling of bad input."""
import json

import pytest

from dsla_model.evaluation import TeacherReference, evaluate_conversions
from dsla_model.layer_store import LayerStore
from dsla_model.passkey import make_prompt
from tests.distill.conftest import tiny_blocks, tiny_hybrid

FIELDS = {"conversion", "dsla_layers", "ppl", "teacher_ppl", "ppl_ratio", "top1_agreement", "kl"}


def test_teacher_reference_scores_the_teacher_as_itself():
    h = tiny_hybrid()
    ref = TeacherReference(h, tiny_blocks(2))
    m = ref.score(h)
    # the reference is kept in fp16: near-ties of a random model may flip, nothing more
    assert m["kl"] == pytest.approx(0.0, abs=1e-3) and m["top1_agreement"] >= 0.97
    assert m["ppl"] == pytest.approx(ref.metrics["ppl"], rel=1e-3)


def test_evaluate_conversions_fields(tmp_path):
    h = tiny_hybrid()
    order = [2, 0, 1]
    store = LayerStore(tmp_path / "s")
    store.init("tiny", h.fingerprint, order, h.dsla_config)
    for layer in order:
        store.publish(layer, h.new_dsla_module(layer).state_dict(), {})
    res = evaluate_conversions(h, None, [0, 0.34, 1.0], order, store.apply, tiny_blocks(2))
    assert [r["conversion"] for r in res] == [0, 0.34, 1.0]
    assert all(FIELDS <= set(r) for r in res)
    assert res[0]["ppl_ratio"] == 1.0 and res[0]["dsla_layers"] == [] and res[0]["kl"] == 0
    assert res[1]["dsla_layers"] == [2] and res[2]["dsla_layers"] == [0, 1, 2]
    assert res[2]["kl"] > 0 and h.dsla_layers == []  # the model is left all-attention


def test_passkey_prompt_length_and_answer():
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    for ctx in (512, 1024):
        prompt, answer = make_prompt(tok, ctx, 12345, 0.5)
        assert abs(len(prompt) + len(answer) - ctx) <= 2
        assert "12345" in tok.decode(prompt) and tok.decode(answer).strip() == "12345"
    with pytest.raises(ValueError):
        make_prompt(tok, 20, 12345, 0.5)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--conversion", "0,abc"], "--conversion"),
    (["eval", "--conversion", "1.5"], "--conversion"),
    (["eval", "--conversion", "0.5", "--blocks", "0"], "--blocks"),
    (["eval", "--store", "/nonexistent/store", "--model", "MODEL", "--conversion", "0.5"], "not a layer store"),
    (["distill", "--store", "STORE", "--layers", "0"], "--layers"),
    (["distill", "--store", "STORE", "--model", "/nonexistent/dir/x", "--layers", "1"], "model"),
    # each of these was a traceback (and --gate-rank -1 left a store that refused every later run)
    (["distill", "--store", "STORE", "--model", "MODEL", "--gate-rank", "-1"], "--gate-rank"),
    (["distill", "--store", "STORE", "--model", "MODEL", "--threads", "-1"], "--threads"),
    (["distill", "--store", "", "--model", "MODEL"], "--store"),
    (["distill", "--store", "AFILE", "--model", "MODEL"], "not a directory"),
    (["eval", "--model", "MODEL", "--conversion", "0.5", "--threads", "-1"], "--threads"),
    (["eval", "--model", "MODEL", "--conversion", "0.5", "--passkey", "--passkey-trials", "0"], "--passkey-trials"),
    (["eval", "--model", "MODEL", "--conversion", "0.5", "--out-dir", "AFILE"], "not a directory"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--temperature", "nan", "--no-cache"], "temperature"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--seed", "-1", "--no-cache"], "seed"),
    (["generate", "--model", "MODEL", "--prompt", "x", "--max-tokens", "600", "--no-cache"], "512 positions"),
    (["generate", "--model", "GPT2", "--prompt", "x"], "not supported"),
    (["distill", "--store", "STORE", "--model", "MODEL", "--lr", "inf"], "--lr"),  # published NaN layers
])
def test_bad_cli_input_exits_non_zero_with_a_message(argv, message, capsys, tiny_model_dir, tmp_path):
    from deploy.cli import main

    (tmp_path / "afile").write_text("x")
    subs = {"MODEL": tiny_model_dir, "STORE": str(tmp_path / "s"), "AFILE": str(tmp_path / "afile")}
    if "GPT2" in argv:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
        subs["GPT2"] = str(tmp_path / "gpt2")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "gpt2" / f).write_bytes(open(f"{tiny_model_dir}/{f}", "rb").read())
    argv = [subs.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "manifest.json").exists()  # nothing half-made


def test_order_uses_the_settings_distill_uses(monkeypatch, tiny_model_dir, capsys):
    """`order` built its model with other DSLA settings than `distill`, so it printed (and cached)
    another damage order than the one distill then used."""
    import distill_workers.damage as damage
    from deploy.cli import main
    from distill_workers.runner import DEFAULT_DSLA
    from dsla_model.dsla_attention import DSLAConfig

    seen = []
    monkeypatch.setattr(damage, "damage_order", lambda h, tok: seen.append(h.dsla_config) or ([0, 1, 2], [0.0] * 3))
    assert main(["order", "--model", tiny_model_dir, "--json"]) == 0
    assert seen == [DSLAConfig(**DEFAULT_DSLA)] and json.loads(capsys.readouterr().out)["order"] == [0, 1, 2]


def test_cli_eval_json_on_a_text_file(tiny_model_dir, tmp_path, capsys):
    from deploy.cli import main
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model

    hf, _, _ = load_model(tiny_model_dir)
    h = HybridModel(hf)
    store = LayerStore(tmp_path / "s")
    store.init("tiny", h.fingerprint, [1, 0, 2], h.dsla_config)
    store.publish(1, h.new_dsla_module(1).state_dict(), {})
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    rc = main(["eval", "--model", tiny_model_dir, "--store", str(store.path), "--conversion", "0,0.34",
               "--text-file", str(text), "--blocks", "2", "--json", "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 2 and all(FIELDS <= set(r) for r in res) and res[1]["dsla_layers"] == [1]
    assert (tmp_path / "out" / "eval.md").exists()
    # a conversion the store cannot serve is refused up front
    assert main(["eval", "--model", tiny_model_dir, "--store", str(store.path), "--conversion", "1",
                 "--text-file", str(text)]) == 2
    assert "lacks layers" in capsys.readouterr().err


def test_a_report_that_fails_half_way_leaves_the_old_one(tmp_path, monkeypatch):
    from pathlib import Path

    from dsla_model.eval_report import write_report

    rows = [{"conversion": 0.0, "dsla_layers": [], "ppl": 10.0, "teacher_ppl": 10.0, "ppl_ratio": 1.0,
             "top1_agreement": 1.0, "kl": 0.0}]
    write_report(rows, {"model": "m"}, tmp_path, "eval")
    before = (tmp_path / "eval.md").read_text()
    real = Path.write_text

    def half(self, text, *a, **k):  # a full disk, say: half the text, then an error
        real(self, text[:len(text) // 2], *a, **k)
        raise OSError("No space left on device")
    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError):
        write_report([dict(rows[0], ppl=20.0)], {"model": "m"}, tmp_path, "eval")
    monkeypatch.undo()
    assert (tmp_path / "eval.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval.md", "eval.json"] + (
        ["eval.png"] if (tmp_path / "eval.png").exists() else []))


def test_a_plot_that_fails_half_way_leaves_the_old_one(tmp_path, monkeypatch):
    """The PNG was written in place: a failed savefig left a truncated eval.png beside a whole report."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from dsla_model.eval_report import write_report

    rows = [{"conversion": 0.0, "dsla_layers": [], "ppl": 10.0, "teacher_ppl": 10.0, "ppl_ratio": 1.0,
             "top1_agreement": 1.0, "kl": 0.0}]
    assert str(tmp_path / "eval.png") in write_report(rows, {"model": "m"}, tmp_path, "eval")
    before = (tmp_path / "eval.png").read_bytes()
    assert before.startswith(b"\x89PNG")

    def half(self, path, **kw):
        with open(path, "wb") as f:
            f.write(before[:100])
        raise OSError("No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)
    with pytest.raises(OSError):
        write_report([dict(rows[0], ppl=20.0)], {"model": "m"}, tmp_path, "eval")
    assert (tmp_path / "eval.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "eval.png"]


def test_passkey_counts_a_longer_number_as_a_miss():
    """Scoring looked only at the answer's positions: a model answering 604946 for the key 60494
    (SmolLM2 writes numbers digit by digit) scored as a hit. The next token must end the number."""
    import re

    import torch
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir
    from dsla_model.passkey import QUESTION, passkey_accuracy

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731

    class Answers(torch.nn.Module):
        """Causal: reads the key from the needle and answers it, followed by `extra`."""

        def __init__(self, extra):
            super().__init__()
            self.extra, self.p = extra, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            ids = ids[0].tolist()
            out = torch.zeros(1, len(ids), len(tok))
            text = tok.decode(ids)
            key = re.search(r"The pass key is (\d+)\.", text).group(1)
            start = len(ids) - len(enc(f" {key}")) - 1  # the position that predicts the answer's first token
            want = enc(f" {key}{self.extra}")
            for i, t in enumerate(range(start, len(ids))):
                out[0, t, want[i] if i < len(want) else enc("\n")[0]] = 1
            return out

    assert passkey_accuracy(Answers("\n"), tok, contexts=(512,), trials=2)["mean"] == 1.0
    assert passkey_accuracy(Answers("6"), tok, contexts=(512,), trials=2)["mean"] == 0.0
    assert QUESTION.endswith("is")


def test_the_kl_phase_never_keeps_diverged_weights():
    """after > before is False for NaN: a diverged KL phase kept its NaN weights (kl_kept False)."""
    import torch

    from distill_workers.kl_phase import kl_phase, teacher_logprobs
    from distill_workers.layer_data import capture_layer

    h = tiny_hybrid()
    blocks = tiny_blocks(4)
    lp = teacher_logprobs(h, blocks)
    data = capture_layer(h, 1, blocks, batch=2, resid_blocks=4)
    module = h.new_dsla_module(1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    res = kl_phase(h, 1, module, data, lp, steps=2, lr=float("inf"))
    assert not res["kl_kept"]
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_eval_scores_no_passkey_context_past_the_models_positions(tiny_model_dir, tmp_path, capsys):
    """The tiny model has 512 positions: its 1024- and 2048-token passkey prompts were scored anyway
    (0.0 for the teacher too, a model out of range); now only the contexts it has are. A text file
    that exists but cannot be read is an error message, not a traceback."""
    from deploy.cli import main
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model

    h = HybridModel(load_model(tiny_model_dir)[0], DSLAConfig())
    LayerStore(tmp_path / "s").init("tiny", h.fingerprint, [2, 0, 1], h.dsla_config)
    assert main(["eval", "--model", tiny_model_dir, "--store", str(tmp_path / "s"), "--conversion", "0",
                 "--blocks", "1", "--passkey", "--passkey-trials", "1", "--out-dir", "", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(res[0]["passkey_by_context"]) == ["512"]
    assert main(["eval", "--model", tiny_model_dir, "--store", str(tmp_path / "s"), "--conversion", "0",
                 "--text-file", "/proc/self/mem", "--out-dir", ""]) == 2
    err = capsys.readouterr().err
    assert "Input/output error" in err and "Traceback" not in err


def test_a_bad_or_unwritable_damage_order_cache_costs_a_recompute_not_the_run(tmp_path, monkeypatch, caplog):
    """A truncated or edited cache file raised (JSONDecodeError, KeyError) and a read-only cache
    directory threw away the measured order with a traceback; both are now warnings."""
    import os

    from distill_workers import damage

    path = tmp_path / "c.json"
    for bad in ('{"order": [0, 1', '{"order": [0, 0, 1], "damage": {"0": 1, "1": 2, "2": 3}}', '[1, 2]',
                '{"order": [2, 0, 1], "damage": {"0": "x"}}'):
        path.write_text(bad)
        assert damage._read_cached(path, 3) is None
    path.write_text('{"order": [2, 0, 1], "damage": {"0": 0.5, "1": 0.7, "2": 0.1}}')
    assert damage._read_cached(path, 3) == ([2, 0, 1], {0: 0.5, 1: 0.7, 2: 0.1})
    assert damage._read_cached(tmp_path / "none.json", 3) is None

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    tok = _tokenizer()  # before the cache is made unwritable: the default model lives there
    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr("dsla_model.loading.cache_root", lambda: tmp_path / "cache")
    h = tiny_hybrid(vocab=len(tok))
    cfg = damage.DistillConfig(tokens_per_layer=48, train_blocks=2, block_size=48, train_chunk_size=8, kl_steps=0)
    text = tmp_path / "t.txt"
    text.write_text(open("/usr/share/common-licenses/GPL-3").read())
    order, dmg = damage.damage_order(h, tok, cfg, text_file=str(text))
    assert sorted(order) == [0, 1, 2] and set(dmg) == {0, 1, 2}
    assert "not cached" in caplog.text


def _tokenizer():
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def test_eval_writes_no_report_unless_told_where():
    """Its default was docs/results: any run from the repo root overwrote the committed report."""
    from deploy.cli import build_parser

    assert build_parser().parse_args(["eval"]).out_dir == ""
