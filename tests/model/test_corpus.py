"""The corpus: real text, deterministic split by document."""
import pytest

from dsla_model import corpus


def test_html_to_text_drops_chrome_and_scripts():
    html = ("<html><head><title>T</title></head><body><div class='related'>nav</div>"
            "<script>x=1</script><h1>Title\u00b6</h1><p>Hello <b>world</b>.</p></body></html>")
    assert corpus.html_to_text(html) == "Title\n\nHello world."


def test_split_is_deterministic_and_disjoint():
    try:
        train = corpus.documents("train")
        val = corpus.documents("validation")
    except corpus.CorpusMissingError:
        pytest.skip("python3.11-doc not installed")
    assert len(train) > 300 and len(val) > 20
    assert not set(train) & set(val)
    assert corpus.documents("validation") == val
    assert sum(len(d) for d in train) > 5_000_000


def test_unknown_split_and_missing_root_raise(tmp_path):
    with pytest.raises(ValueError):
        corpus.documents("test")
    with pytest.raises(corpus.CorpusMissingError):
        corpus.document_paths(tmp_path / "nope")


def test_a_torn_corpus_cache_is_parsed_again(tmp_path, monkeypatch):
    """The parsed text's cache was read without a check: a file torn by a crash failed `order`,
    `generate --conversion`, `distill` and `eval` on every run until someone deleted it."""
    import hashlib

    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "document_paths", lambda base: [])
    parsed = {"train": ["a document"], "validation": ["another"]}
    monkeypatch.setattr(corpus, "_parse_all", lambda base: parsed)
    path = tmp_path / "corpus" / (hashlib.sha256(b"").hexdigest()[:16] + ".json")
    path.parent.mkdir(parents=True)
    for torn in ("", '{"train": ["a docu', "[1, 2]"):
        path.write_text(torn)
        assert corpus._all_documents(str(tmp_path / "docs")) == parsed
    assert corpus._all_documents(str(tmp_path / "docs")) == parsed  # and the rewritten cache reads back
