"""Issue 14: packs for any concept from contrastive files (tiny model), the files' formats, the
selection rule, and the pack's record of what it is."""

from __future__ import annotations

import json

import pytest
import torch

from steering import SteeringSpec, build_row, load_pack
from steering.data.contrastive import (
    SHIPPED_CONCEPTS,
    Example,
    load_examples,
    shipped_behaviour,
)
from steering.data.register import mean_casual_score
from steering.evaluation.passes import decode, generate_greedy
from steering.extraction.behaviour import LoglikGap, Pair, ScoredAnswers, validation_pairs
from steering.extraction.concept import (
    NO_BEHAVIOUR,
    ConceptConfig,
    choose,
    extract_concept,
    paired_split,
    separation,
    split,
    summary,
)
from steering.extraction.inlp import InlpConfig
from steering.models.chat import format_chat
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
    # its scorer goes with the two sets (steer extract given them chooses by it), not with others
    assert shipped_behaviour(concept.positive, concept.negative) is mean_casual_score
    assert shipped_behaviour(concept.negative, concept.positive) is None


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


def test_choose_ranks_by_behaviour_then_fisher_else_kl_add():
    def cand(layer, acc, fisher, kl_add, behaviour, kl_ablate=0.01):
        return {"layer": layer, "position": -1, "val_accuracy": acc, "fisher": fisher,
                "kl_ablate": kl_ablate, "kl_add": kl_add, "behaviour": behaviour}

    scores = [cand(1, 1.0, 9.0, 0.9, 0.1), cand(2, 1.0, 3.0, 0.1, 0.7),
              cand(3, 0.9, 1.0, 0.5, 5.0),  # better behaviour, worse held-out accuracy
              cand(4, 1.0, 8.0, 0.2, 9.0, kl_ablate=0.5)]  # fails the KL filter
    assert choose(scores, 0.2)[0]["layer"] == 2
    scores[0]["behaviour"] = 0.7  # a tie: Fisher decides
    assert choose(scores, 0.2)[0]["layer"] == 1
    for s in scores:
        s["behaviour"] = None  # no behavioural score: the one adding moves most
    scores[1]["kl_add"] = 2.0
    assert choose(scores, 0.2)[0]["layer"] == 2


# ---- extraction on the tiny model -----------------------------------------------------------


def _register(n: int):
    concept = SHIPPED_CONCEPTS["casual"]
    return load_examples(concept.positive)[:n], load_examples(concept.negative)[:n]


def test_prompt_concept_pack_holds_every_method(tiny_lm, tmp_path):
    pos, neg = _register(12)
    pack = extract_concept(tiny_lm, pos, neg, "casual", FAST, sources=("p.json", "n.json"))
    assert pack.concept == "casual" and pack.meta["concept"]["read"] == "post_instruction"
    # prompt-only without a scorer: no behavioural score, the choice by kl_add (said so)
    assert pack.meta["selection"]["choice"] == NO_BEHAVIOUR
    assert pack.meta["selection"]["behaviour"] is None
    assert all(s["behaviour"] is None for s in pack.meta["selection"]["candidates"])
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


CASUAL = ["Sure thing, buddy! Here it is.", "Yeah, totally, here you go!",
          "Oh cool, gotcha! Lots of stuff.", "Hey, no problem at all!"]
FORMAL = ["Certainly. Please find it below.", "Kindly note the following details.",
          "It is recommended to proceed as follows.", "Accordingly, the answer is given below."]


def _pairs(n: int = 12):
    return ([Example(f"Say something about topic {i}", CASUAL[i % 4]) for i in range(n)],
            [Example(f"Say something about topic {i}", FORMAL[i % 4]) for i in range(n)])


def _mean_logprob(lm, pairs: list[Pair], side: str) -> float:
    """Per-token mean log p(completion | chat prompt), pooled, from plain unbatched forwards."""
    tok = lm.tokenizer
    total, count = 0.0, 0
    for p in pairs:
        head = tok(format_chat(tok, p.prompt), add_special_tokens=False)["input_ids"]
        body = tok(getattr(p, side), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model(torch.tensor([head + body])).logits[0].float()
        logp = torch.log_softmax(logits[len(head) - 1:-1], -1)
        total += float(logp.gather(1, torch.tensor(body)[:, None]).sum())
        count += len(body)
    return total / count


def test_paired_completions_are_split_together_and_scored_by_likelihood(tiny_lm):
    pos, neg = _pairs()
    pos_train, pos_val, neg_train, neg_val = paired_split(pos, neg, 0.25, 0)
    assert [e.prompt for e in pos_val] == [e.prompt for e in neg_val]
    assert [e.prompt for e in pos_train] == [e.prompt for e in neg_train]
    pairs = validation_pairs(pos_val, neg_val, True, 8)
    assert [(p.positive in CASUAL, p.negative in FORMAL) for p in pairs] == [(True, True)] * 3
    # the unsteered gap is the log-likelihood difference of the two completions
    gap = LoglikGap(tiny_lm, pairs, batch_size=2)
    plus, minus = _mean_logprob(tiny_lm, pairs, "positive"), _mean_logprob(tiny_lm, pairs,
                                                                           "negative")
    assert gap.mean_logprobs(None) == pytest.approx((plus, minus), abs=1e-4)
    assert gap.base == pytest.approx(plus - minus, abs=1e-4)

    pack = extract_concept(tiny_lm, pos, neg, "tone", FAST)
    sel = pack.meta["selection"]
    assert pack.meta["concept"]["paired"] and sel["behaviour"]["measure"] == "loglik_gap"
    assert sel["choice"].startswith("behaviour (loglik_gap)")
    assert sel["behaviour"]["base"] == pytest.approx(gap.base, abs=1e-6)
    checked = [s for s in sel["candidates"] if s["kl_ablate"] is not None]
    assert len(checked) == 2 and all(s["behaviour"] is not None for s in checked)
    for s in checked:
        pack.layer = s["layer"]
        up = gap(build_row(SteeringSpec("actadd", 1.0), pack))
        assert up == pytest.approx(s["behaviour"], abs=1e-6)  # what the sidecar recorded
        down = gap(build_row(SteeringSpec("actadd", -1.0), pack))
        assert up * down < 0  # the negated direction moves the gap the other way
    best = max(checked, key=lambda s: (s["behaviour"], s["fisher"]))
    assert (sel["chosen"]["layer"], sel["chosen"]["position"]) == (best["layer"],
                                                                   best["position"])


def test_scored_answers_batch_every_row_as_if_alone(tiny_pack, tiny_lm):
    """The prompt-only score generates the unsteered and every candidate's answers in one batch;
    each row's answers are those it gets alone."""
    prompts = [e.prompt for e in _register(3)[1]]
    rows = [build_row(SteeringSpec("actadd", s), tiny_pack) for s in (1.0, -2.0)]
    measure = ScoredAnswers(tiny_lm, prompts, lambda texts: float(len("".join(texts))), 8)
    together = measure.answers([None, *rows])
    alone = [decode(tiny_lm, generate_greedy(tiny_lm, prompts, row, 8)[0])
             for row in (None, *rows)]
    assert together == alone and together[1] != together[0]
    assert measure.evaluate(rows) == [len("".join(t)) - len("".join(alone[0]))
                                      for t in alone[1:]]


def test_prompt_only_choice_follows_the_scorer(tiny_lm):
    pos, neg = _register(12)  # both candidates separate equally well (0.83) on the tiny model
    config = ConceptConfig(kl_candidates=2, kl_prompts=2, batch_size=8, kl_threshold=1e9,
                           behaviour_prompts=3, behaviour_tokens=8,
                           inlp=InlpConfig(max_directions=1, chance_margin=0.0, p_value=1.0))
    seen: list[list[str]] = []
    pack = extract_concept(tiny_lm, pos, neg, "casual", config,
                           behaviour=lambda texts: seen.append(texts) or 0.0)
    candidates = pack.meta["selection"]["candidates"]
    top = max(s["val_accuracy"] for s in candidates)
    at_top = {s["layer"] for s in candidates if s["val_accuracy"] == top}
    assert len(seen) == 3 and len(at_top) == 2  # the unsteered answers, then one per candidate
    assert seen[1] != seen[2] and seen[0] not in seen[1:]
    chosen = set()
    for target in seen[1:]:  # a scorer that rewards one candidate's answers picks it
        pack = extract_concept(tiny_lm, pos, neg, "casual", config,
                               behaviour=lambda texts, t=target: float(texts == t))
        sel = pack.meta["selection"]
        assert sel["behaviour"]["measure"] == "scorer" and sel["behaviour"]["base"] == 0.0
        assert sel["chosen"]["behaviour"] == 1.0 and sel["choice"].startswith("behaviour")
        assert sorted(s["behaviour"] for s in sel["candidates"]) == [0.0, 1.0]
        chosen.add(pack.layer)
    assert chosen == at_top


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
    assert pack.meta["selection"]["behaviour"]["scorer"] == (
        "steering.data.register.mean_casual_score")
    assert all(p.is_file() for p in pack_paths(store.default_pack_path(tiny_lm, "casual")))
    [again] = shipped_concept_packs(tiny_lm, "casual")
    assert calls == ["casual"] and torch.equal(again.dim(), pack.dim())  # from the cache
    assert shipped_concept_packs(tiny_lm, "nope") == []
    assert "nope" in caplog.text
