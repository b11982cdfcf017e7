"""Issue 28 item 11 on a tiny checkpoint: what the server's start-up does in this process and
what it leaves to the preparation child. From a full cache it loads only; with the pack missing
it asks the child (and never extracts in this process); if the child could not make the pack the
start fails instead of extracting here. The memory itself is measured on the real server
(tests/real/test_memory_real.py)."""

from __future__ import annotations

import pytest

from server import app as app_module
from server.settings import Settings
from steering.extraction import extract as extract_module
from steering.extraction.store import default_pack_path, pack_cached
from steering.models import file_hash
from testkit.tiny import make_tiny


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_hash, "_memo", {})
    tiny = make_tiny("qwen2")
    path = tmp_path / "tiny"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def no_extraction_here(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("extraction ran in the serving process")

    monkeypatch.setattr(extract_module, "extract_pack", refuse)


def settings_for(folder) -> Settings:
    return Settings(model=str(folder), device="cpu", precision="fp32", concept_packs="")


def test_a_missing_pack_is_made_by_the_child(folder, tiny_pack, monkeypatch, no_extraction_here):
    calls = []

    def child(settings):  # stands in for the spawned process: it leaves the pack in the cache
        calls.append(settings)
        lm = app_module.steering.load_model(settings.model, "cpu", precision="fp32")
        tiny_pack.save(default_pack_path(lm))

    monkeypatch.setattr(app_module, "_in_child", child)
    lm, packs = app_module._load_model_and_pack(settings_for(folder))
    assert len(calls) == 1 and pack_cached(lm)
    assert packs[0].name == "refusal"
    lm, packs = app_module._load_model_and_pack(settings_for(folder))  # now from the cache
    assert len(calls) == 1


def test_the_start_fails_when_the_child_made_nothing(folder, monkeypatch, no_extraction_here):
    monkeypatch.setattr(app_module, "_in_child", lambda settings: None)
    with pytest.raises(RuntimeError, match="not extracted"):
        app_module._load_model_and_pack(settings_for(folder))
