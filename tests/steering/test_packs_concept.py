"""Issue 14: packs for any concept from contrastive files (tiny model), the files' formats, the
selection rule, and the pack's record of what it is."""

from __future__ import annotations

import json

import pytest
import torch

from steering import SteeringSpec, build_row, load_pack
from steering.data.contrastive import SHIPPED_CONCEPTS, Example, load_examples
from steering.extraction.concept import (
    ConceptConfig,
    choose,
    extract_concept,
    separation,
    split,
    summary,
)
from steering.extraction.inlp import InlpConfig
from steering.packs.format import pack_paths

FAST = ConceptConfig(kl_candidates=2, kl_prompts=4, batch_size=8,
                     inlp=InlpConfig(max_directions=2, chance_margin=0.0, p_value=1.0))


# ---- files ------------------------------------------------------------------------------------


def test_every_file_format_loads(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "one"}, {"prompt": "two"}]))
    (tmp_path / "c.jsonl").write_text('{"prompt": "one", "completion": "1"}\n\n"two"\n')
    (tmp_path / "d.csv").write_text('question,answer\n"one, really",1\ntwo,2\n')
    (tmp_path / "e.txt").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_examples(tmp_path / "a.json") == [Example("one"), Example("two")]
    assert load_examples(tmp_path / "b.json") == [Example("one"), Example("two")]
    assert load_examples(tmp_path / "d.csv") == [Example("one, really", "1"), Example("two", "2")]
    assert load_examples(tmp_path / "e.txt") == [Example("one"), Example("two")]
    with pytest.raises(ValueError, match="every example has a completion or none"):
        load_examples(tmp_path / "c.jsonl")


@pytest.mark.parametrize("text, match", [
    ("{}", "list"), ("[1]", "string or an object"), ('[{"x": "a"}]', "no prompt"),
    ("[]", "no examples"), ("not json", "neither JSON nor JSONL"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, match):
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_examples(tmp_path / "x.json")


def test_the_shipped_register_sets_pair_up():
    concept = SHIPPED_CONCEPTS["casual"]
    pos, neg = load_examples(concept.positive), load_examples(concept.negative)
    assert len(pos) == len(neg) >= 60
    assert len({e.prompt for e in pos} | {e.prompt for e in neg}) == len(pos) + len(neg)


# ---- selection --------------------------------------------------------------------------------


def test_split_is_seeded_and_keeps_both_sides():
    examples = [Example(str(i)) for i in range(10)]
    train, val = split(examples, 0.25, seed=3)
    assert (train, val) == split(examples, 0.25, seed=3)
    assert len(val) == 2 and len(train) == 8 and set(train).isdisjoint(val)
    with pytest.raises(ValueError, match="at least 4"):
        split(examples[:3], 0.25, 0)


def test_separation_sees_a_separable_direction_and_not_noise():
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[0] = 6.0
    pos, neg = torch.randn(40, 16, generator=g) + shift, torch.randn(40, 16, generator=g)
    good = separation(pos[:30], neg[:30], pos[30:], neg[30:])
    assert good["val_accuracy"] >= 0.95 and good["fisher"] > 5
    noise = separation(neg[:20], neg[20:30], neg[30:35], neg[35:])
    assert noise["fisher"] < good["fisher"] / 10


def test_choose_filters_on_ablation_kl_then_falls_back():
    scores = [{"layer": 1, "position": -1, "val_accuracy": 1.0, "fisher": 9.0, "kl_ablate": 0.5},
              {"layer": 2, "position": -1, "val_accuracy": 0.9, "fisher": 3.0, "kl_ablate": 0.01},
              {"layer": 3, "position": -1, "val_accuracy": 1.0, "fisher": 1.0, "kl_ablate": None}]
    chosen, filters = choose(scores, 0.1)
    assert chosen["layer"] == 2 and filters == "kl"
    chosen, filters = choose(scores, 0.001)
    assert chosen["layer"] == 1 and filters == "none"


# ---- extraction on the tiny model -----------------------------------------------------------


def _register(n: int):
    concept = SHIPPED_CONCEPTS["casual"]
    return load_examples(concept.positive)[:n], load_examples(concept.negative)[:n]


def test_prompt_concept_pack_holds_every_method(tiny_lm, tmp_path):
    pos, neg = _register(12)
    pack = extract_concept(tiny_lm, pos, neg, "casual", FAST, sources=("p.json", "n.json"))
    assert pack.concept == "casual" and pack.meta["concept"]["read"] == "post_instruction"
    assert set(pack.methods) >= {"actadd", "ablate", "ace"}
    sel = pack.meta["selection"]
    lo, hi = int(0.25 * tiny_lm.n_layers), int(0.75 * tiny_lm.n_layers)
    assert all(max(1, lo) <= s["layer"] < max(hi, lo + 1) for s in sel["candidates"])
    assert sum(s["kl_ablate"] is not None for s in sel["candidates"]) == min(
        2, len(sel["candidates"]))
    data = pack.meta["data"]
    assert data["positive_train"]["n"] + data["positive_val"]["n"] == 12
    assert data["positive_train"]["source"] == "p.json"
    assert pack.meta["hook"]["blocks"] == "model.layers"
    assert "concept 'casual'" in summary(pack)
    back = load_pack(pack.save(tmp_path / "casual"), model=tiny_lm.model)
    assert back.concept == "casual" and back.methods == pack.methods
    assert back.meta["vectors"]["dim"]["operations"] == ["add", "ablate"]
    for method in back.methods:
        assert build_row(SteeringSpec(method, 1.0), back).edits


def test_completion_concept_pack_reads_the_completion(tiny_lm):
    pos = [Example(f"Say something {i}", "Sure thing, buddy! Here it is.") for i in range(8)]
    neg = [Example(f"Say something {i}", "Certainly. Please find it below.") for i in range(8)]
    pack = extract_concept(tiny_lm, pos, neg, "tone", FAST)
    assert pack.positions == [-1] and pack.meta["concept"]["read"] == "completion_mean"
    # the same prompts on both sides: the direction comes from the completions alone
    assert pack.dim().norm() > 0
    with pytest.raises(ValueError, match="both classes"):
        extract_concept(tiny_lm, pos, [Example("x")] * 8, "tone", FAST)


# ---- the command line -------------------------------------------------------------------------


def test_extract_export_import_commands(tiny_lm, tmp_path, capsys):
    from server.cli import main

    folder = tmp_path / "model"
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    pos, neg = _register(8)
    (tmp_path / "pos.jsonl").write_text("\n".join(json.dumps({"prompt": e.prompt}) for e in pos))
    (tmp_path / "neg.csv").write_text("prompt\n" + "\n".join(f'"{e.prompt}"' for e in neg))
    common = ["--model", str(folder), "--precision", "fp32"]
    assert main(["extract", *common, "--positive", str(tmp_path / "pos.jsonl"), "--negative",
                 str(tmp_path / "neg.csv"), "--name", "casual", "--out",
                 str(tmp_path / "casual")]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report["concept"] == "casual" and "actadd" in report["methods"]
    assert "val acc" in out.err  # the selection summary
    pack = load_pack(tmp_path / "casual")
    assert pack.meta["data"]["negative_train"]["source"].endswith("neg.csv")
    assert main(["export", "--pack", str(tmp_path / "casual"), "--format", "llamacpp",
                 "--layers", "2,3", "--out", str(tmp_path / "cv.gguf")]) == 0
    assert main(["import", *common, str(tmp_path / "cv.gguf"), "--name", "cv", "--out",
                 str(tmp_path / "cv")]) == 0
    assert load_pack(tmp_path / "cv").methods == ["actadd"]
    assert main(["export", *common, "--pack", str(tmp_path / "casual"), "--format",
                 "peft-lora", "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    # the imported, addition-only pack cannot become an ablation adapter
    assert main(["export", *common, "--pack", str(tmp_path / "cv"), "--format", "peft-lora",
                 "--out", str(tmp_path / "lora2")]) == 2
    assert main(["extract", *common, "--positive", str(tmp_path / "pos.jsonl")]) == 2


# ---- the shipped concept: cached at first use, served --------------------------------------


def test_shipped_concept_pack_is_extracted_once_and_cached(tiny_lm, tmp_path, monkeypatch, caplog):
    import steering.extraction.concept as concept
    from server.packs import shipped_concept_packs
    from steering.extraction import store

    monkeypatch.setenv("STEERING_CACHE", str(tmp_path))
    monkeypatch.setattr(concept, "ConceptConfig", lambda: FAST)
    calls = []
    real = concept.extract_concept
    monkeypatch.setattr(concept, "extract_concept",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    [pack] = shipped_concept_packs(tiny_lm, "casual, ,")
    assert calls == ["casual"] and pack.meta["concept"]["positive"] == "package:register_casual"
    assert all(p.is_file() for p in pack_paths(store.default_pack_path(tiny_lm, "casual")))
    [again] = shipped_concept_packs(tiny_lm, "casual")
    assert calls == ["casual"] and torch.equal(again.dim(), pack.dim())  # from the cache
    assert shipped_concept_packs(tiny_lm, "nope") == []
    assert "nope" in caplog.text
