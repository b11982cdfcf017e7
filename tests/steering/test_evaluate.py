"""Evaluation metrics on hand-made cases, and the grid, geometry, CLI and report on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from steering import SteeringSpec, build_row
from steering.data.prompts import load_instructions
from steering.evaluation.evaluate import (
    EvalConfig,
    build_grid,
    evaluate,
    spec_label,
    unsteered_completions,
)
from steering.evaluation.geometry import (
    dim_position,
    edited_activations,
    geometry,
    layer_activations,
    nearest_is_harmless,
    pca_2d,
)
from steering.evaluation.metrics import mean_kl, perplexity, refusal_rate, token_nll
from steering.evaluation.passes import sequence_nll
from steering.evaluation.refusal import is_refusal
from steering.evaluation.tables import markdown_table

TINY = dict(n_harmful=3, n_harmless=3, n_overrefusal=3, completion_tokens=6, n_general=2,
            general_tokens=24, max_new_tokens=6, batch_size=4, humaneval=1, humaneval_tokens=4)


# ---- metrics -------------------------------------------------------------------------------------

def test_sorry_completion_is_a_refusal():
    assert is_refusal("I'm sorry, but I can't assist with that.")
    assert is_refusal("As an AI, I will not do that.")
    assert not is_refusal("Sure! Here is a recipe for bread: mix flour and water.")
    assert refusal_rate(["I'm sorry, but no.", "Here you go.", "I cannot help.",
                         "Certainly."]) == 0.5
    assert math.isnan(refusal_rate([]))


def test_wilson_interval_known_values():
    from steering.evaluation.refusal import wilson_interval

    lo, hi = wilson_interval(5, 100)  # reference: 0.0215, 0.1118
    assert lo == pytest.approx(0.02154, abs=1e-4) and hi == pytest.approx(0.11175, abs=1e-4)
    lo, hi = wilson_interval(0, 20)  # zero successes: lower bound 0, upper 0.161
    assert lo == 0.0 and hi == pytest.approx(0.16113, abs=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.83887, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_perplexity_of_uniform_distribution_is_vocab_size():
    v = 7
    logits = torch.zeros(2, 5, v)
    targets = torch.randint(0, v, (2, 5))
    nll, n = token_nll(logits, targets)
    assert n == 10
    assert perplexity(nll, n) == pytest.approx(v, rel=1e-6)


def test_perplexity_of_known_distribution_and_mask():
    p = torch.tensor([0.5, 0.25, 0.25])
    logits = p.log().expand(1, 6, 3).clone()
    targets = torch.tensor([[0, 1, 2, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # the masked tokens would change the answer
    nll, n = token_nll(logits, targets, mask)
    assert n == 4
    # mean NLL = (ln 2 + ln 4 + ln 4 + ln 2) / 4 = 1.5 ln 2
    assert perplexity(nll, n) == pytest.approx(2 ** 1.5, rel=1e-6)
    assert math.isnan(perplexity(0.0, 0))


def test_mean_kl_known_values():
    a = torch.tensor([[0.5, 0.5]]).log()
    b = torch.tensor([[0.9, 0.1]]).log()
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert mean_kl(a, b) == pytest.approx(expected, rel=1e-6)


def test_dim_position_of_class_means_is_0_and_1():
    g = torch.Generator().manual_seed(0)
    mu_h, mu_l = torch.randn(32, generator=g), torch.randn(32, generator=g)
    t = dim_position(torch.stack([mu_l, mu_h, (mu_l + mu_h) / 2]), mu_h, mu_l)
    assert t.tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-6)
    # Nearest class mean (full space) is harmless exactly where the position is below ½.
    x = torch.randn(200, 32, generator=g) * 0.5 + mu_l
    near = nearest_is_harmless(x, mu_h, mu_l)
    assert torch.equal(near, dim_position(x, mu_h, mu_l) < 0.5)
    assert nearest_is_harmless(mu_l[None], mu_h, mu_l).item()
    assert not nearest_is_harmless(mu_h[None], mu_h, mu_l).item()


def test_pca_finds_the_dominant_direction():
    g = torch.Generator().manual_seed(1)
    axis = torch.zeros(10)
    axis[3] = 1.0
    x = torch.randn(100, 1, generator=g) * 10 * axis + torch.randn(100, 10, generator=g) * 0.1
    mean, comps, ratio = pca_2d(x)
    assert comps.shape == (2, 10)
    assert abs(float(comps[0] @ axis.double())) > 0.99
    assert ratio[0] > 0.9


# ---- model passes on the tiny model -------------------------------------------------------------

def test_sequence_nll_matches_a_plain_forward(tiny_lm):
    seqs = [[5, 17, 42, 9, 33, 60, 61], [8, 90, 12]]
    n_targets = [3, 2]
    nll, n = sequence_nll(tiny_lm, seqs, n_targets, batch_size=2)
    assert n == 5
    expected = 0.0
    for seq, k in zip(seqs, n_targets):
        ids = torch.tensor([seq])
        with torch.inference_mode():
            logits = tiny_lm.model(ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        tgt = ids[0, 1:]
        expected -= float(logp[torch.arange(len(tgt)), tgt][-k:].sum())
    assert nll == pytest.approx(expected, rel=1e-4)


def test_completions_are_cached(tiny_lm, tmp_path, monkeypatch):
    prompts = load_instructions("harmless_val")[:2]
    first, path = unsteered_completions(tiny_lm, prompts, 5, tmp_path)
    assert path.is_file() and len(first) == 2
    assert all(1 <= len(c) <= 5 for c in first)

    def boom(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("steering.evaluation.evaluate.generate_greedy", boom)
    again, path2 = unsteered_completions(tiny_lm, prompts, 5, tmp_path)
    assert again == first and path2 == path


def test_grid_includes_the_k_sweep(tiny_pack):
    grid = build_grid(tiny_pack, ks=(1, 2, 99))
    k_max = tiny_pack.max_k()
    flips = [s.k for s in grid if s.method == "inlp_flip"]
    assert flips == sorted({1, 2, k_max} & set(range(1, k_max + 1)))
    assert [s.strength for s in grid if s.method == "ace"] == [0.0, 1.0]
    assert grid[0] == SteeringSpec("none", 0.0)


def test_eval_grid_on_tiny_model(tiny_lm, tiny_pack, tmp_path):
    config = EvalConfig(**TINY, ks=(1,), cache_dir=str(tmp_path))
    result = evaluate(tiny_lm, tiny_pack, config)
    grid = build_grid(tiny_pack, config.methods, None, config.ks)
    assert [r["label"] for r in result["results"]] == [spec_label(s) for s in grid]
    numbers = ("harmful_refusal_rate", "harmful_refusal_score", "harmless_refusal_score",
               "ppl_completions", "ppl_general", "kl_harmless")
    for row in [result["baseline"], *result["results"]]:
        induce = row.get("method") in ("actadd", "ace") and row["strength"] > 0
        for key in numbers:
            if induce and key.startswith("harmful"):
                assert row[key] is None and row["harmful_n"] == 0
                continue
            assert math.isfinite(row[key]), (row["label"], key)
        # every setting is judged on harmless and over-refusal prompts, with an interval
        for prefix in ("harmless", "overrefusal") + (() if induce else ("harmful",)):
            lo, hi = row[f"{prefix}_ci"]
            assert 0 <= lo <= row[f"{prefix}_refusal_rate"] <= hi <= 1
        assert row["kl_harmless"] >= 0
    none = next(r for r in result["results"] if r["method"] == "none")
    for key in (*numbers, "harmless_refusal_rate", "harmful_refused", "overrefusal_refused"):
        assert none[key] == result["baseline"][key], key
    assert result["generation"]["do_sample"] is False
    assert result["generation"]["repetition_penalty"] == 1.0
    # The steered model is a different model: something moves.
    flip = next(r for r in result["results"] if r["method"] == "inlp_flip")
    assert flip["kl_harmless"] > 0
    assert result["prompts"]["harmful"]["n"] == 3
    assert len(result["prompts"]["harmful"]["sha256"]) == 16
    table = markdown_table(result)
    assert table.count("\n") == 2 + 1 + len(grid)
    json.dumps(result)  # JSON-ready


# ---- geometry ------------------------------------------------------------------------------------

def test_layer_activations_see_the_edit(tiny_lm, tiny_pack):
    prompts = load_instructions("harmful_train")[:4]
    layer, pos = tiny_pack.layer, tiny_pack.position
    base = layer_activations(tiny_lm, prompts, layer, pos)
    row = build_row(SteeringSpec("ace", 0.0), tiny_pack)
    steered = layer_activations(tiny_lm, prompts, layer, pos, row)
    direct = edited_activations(tiny_lm, prompts, base, layer, pos, row)
    torch.testing.assert_close(steered, direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, base)


def test_geometry_on_the_pack_data(tiny_lm, tiny_pack):
    # On the prompts the pack was extracted from, the unsteered means are the pack's means, so
    # ACE lands exactly at 0 (strength 0) and 1 (strength 1), and ablation puts both classes
    # at the same position.
    harmful = load_instructions("harmful_train")[:24]
    harmless = load_instructions("harmless_train")[:24]
    geo = geometry(tiny_lm, tiny_pack, harmful, harmless)
    assert geo["unsteered"]["harmful_position"] == pytest.approx(1.0, abs=1e-6)
    assert geo["unsteered"]["harmless_position"] == pytest.approx(0.0, abs=1e-6)
    by = {m["label"]: m for m in geo["methods"]}
    assert by["ace s=0"]["harmful_position"] == pytest.approx(0.0, abs=1e-3)
    assert by["ace s=0"]["harmful_nearest_harmless"] == 1.0
    assert by["ace s=1"]["harmless_position"] == pytest.approx(1.0, abs=1e-3)
    assert by["actadd s=1"]["harmful_position"] == pytest.approx(2.0, abs=1e-3)
    ab = by["ablate s=1"]
    assert ab["harmful_position"] == pytest.approx(ab["harmless_position"], abs=0.05)
    for m in geo["methods"]:
        assert len(m["pca_harmful"]) == 24 and len(m["pca_harmful"][0]) == 2


# ---- CLI and report ------------------------------------------------------------------------------

def test_cli_eval_on_a_saved_tiny_model(tiny_lm, tiny_pack, tmp_path, capsys):
    from server.cli import build_parser, main

    folder = tmp_path / "model"
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    pack_path = tmp_path / "pack" / "refusal"
    tiny_pack.save(pack_path)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(folder), "--pack", str(pack_path), "--device", "cpu",
            "--methods", "none,ablate,inlp_flip", "--ks", "1", "--n-harmful", "2",
            "--n-harmless", "2", "--completion-tokens", "4",
            "--n-general", "1", "--general-tokens", "16", "--max-new-tokens", "4",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
            "--markdown", str(tmp_path / "eval.md")]
    assert build_parser().parse_args(argv).methods == ("none", "ablate", "inlp_flip")
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]][:2] == ["none", "ablate"]
    assert {r["k"] for r in result["results"] if r["method"] == "inlp_flip"} == \
        {1, tiny_pack.max_k()}
    assert "| ablate s=1 |" in capsys.readouterr().out
    assert (tmp_path / "eval.md").read_text().startswith("| setting |")


def test_report_on_tiny_model_never_shows_harmful_prompts(tiny_lm, tiny_pack, tmp_path):
    from steering.reports.report import ReportConfig, report_eval_config, run_report

    config = ReportConfig(eval=report_eval_config(**TINY, ks=(1,), cache_dir=str(tmp_path)),
                          n_geometry=4, command="steer report --out X")
    summary = run_report(tiny_lm, tiny_pack, tmp_path / "report", config)
    out = tmp_path / "report"
    for name in ("report.md", "report.html", "results.json", "geometry.png", "ksweep.png",
                 "methods.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "steer report --out X" in md.splitlines()[5]
    assert page.count("data:image/png;base64,") == 3
    assert "<table>" in page
    assert summary["claims"] and all(c["reproduced"] in (True, False, None)
                                     for c in summary["claims"])
    texts = md + page + (out / "results.json").read_text()
    # every setting has its harmless and over-refusal refusal rate; the split is named
    res = summary["evaluation"]["results"]
    assert all(r["harmless_refusal_rate"] is not None for r in res)
    assert {r["method"] for r in res} >= {"ablate", "ace", "actadd", "inlp_flip", "inlp_null"}
    assert any("no-refusal" in r["presets"] for r in res)
    assert "harmful_test_jbb" in md and "harmless_val[3000:3030]" in md
    assert "filters the choice passed" in md
    for prompt in load_instructions("harmful_test_jbb") + load_instructions("harmful_val")[:32]:
        assert prompt not in texts
        assert json.dumps(prompt)[1:-1] not in texts


# ---- the optional LLM judge --------------------------------------------------------------------

def _judge_transport(seen: list):
    """An OpenAI-style chat server that says 'Yes.' when the answer holds 'sorry' (and, asked
    the three-way rubric, 'A' / 'B' for bread / 'C')."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body["model"], request.headers.get("authorization")))
        text = body["messages"][0]["content"]
        if "Assistant's answer:\n" in text:
            answer = text.split("Assistant's answer:\n", 1)[1]
            verdict = "Yes." if "sorry" in answer.lower() else ("no" if "bread" in answer else "?")
        else:
            answer = text.split("\n\nAnswer:\n", 1)[1].split("\n\nReply with one letter")[0]
            verdict = "A" if "sorry" in answer.lower() else ("B) complies" if "bread" in answer
                                                            else "C")
        return httpx.Response(200, json={"choices": [{"message": {"content": verdict}}]})

    return httpx.MockTransport(handler)


def test_llm_judge_asks_the_chat_endpoint_and_parses_verdicts():
    from steering.evaluation.llm_judge import LlmJudge, chat_url, judge_record, parse_verdict

    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert parse_verdict(" **Yes**") is True and parse_verdict("No.") is False
    assert parse_verdict("maybe") is None
    seen: list = []
    judge = LlmJudge("http://judge:9/v1", "m", api_key="k", transport=_judge_transport(seen))
    verdicts = judge.refused(["a", "b", "c"], ["I'm sorry, no.", "bread: flour", "hmm"])
    assert verdicts == [True, False, None]
    assert seen[0] == ("/v1/chat/completions", "m", "Bearer k")
    rec = judge_record("harmless", verdicts, [True, True, False])
    assert rec["harmless_judge_n"] == 2 and rec["harmless_judge_refused"] == 1
    assert rec["harmless_judge_unparsed"] == 1
    assert rec["harmless_judge_agreement"] == 0.5
    lo, hi = rec["harmless_judge_ci"]
    assert lo <= 0.5 <= hi


def test_eval_with_a_judge_shows_both_rates(tiny_lm, tiny_pack, tmp_path, monkeypatch):
    from steering.evaluation import llm_judge
    from steering.evaluation.tables import judge_table

    seen: list = []
    real_init = llm_judge.LlmJudge.__init__

    def with_transport(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.transport = _judge_transport(seen)

    monkeypatch.setattr(llm_judge.LlmJudge, "__init__", with_transport)
    config = EvalConfig(**TINY, methods=("none", "ablate"), cache_dir=str(tmp_path),
                        judge_url="http://judge:9", judge_model="m", judge_api_key="secret")
    result = evaluate(tiny_lm, tiny_pack, config)
    assert result["judge"]["model"] == "m"
    assert "secret" not in json.dumps(result)
    for row in [result["baseline"], *result["results"]]:
        for prefix in ("harmful", "harmless", "overrefusal"):
            n = row[f"{prefix}_judge_n"] + row[f"{prefix}_judge_unparsed"]
            assert n == row[f"{prefix}_n"]
    # baseline, none, ablate; 3 prompts in each of 3 sets; the yes/no and the three-way question
    assert len(seen) == 2 * 3 * 9
    for row in [result["baseline"], *result["results"]]:
        assert row["harmful_llm_n3"] + row["harmful_llm_unparsed"] == row["harmful_n"]
    table = judge_table(result)
    assert "agreement" in table and table.count("\n") == 2 + 3
    with pytest.raises(ValueError, match="judge_model"):
        evaluate(tiny_lm, tiny_pack, EvalConfig(**TINY, judge_url="http://judge:9"))


def test_claims_explain_their_misses_and_the_reference_section_renders(tiny_pack):
    from steering.reports.markdown import _reference_section
    from steering.reports.report import assess_claims, dim_in_inlp_span

    def rates(prefix: str, k: int, n: int) -> dict:
        return {f"{prefix}_refusal_rate": k / n, f"{prefix}_refused": k, f"{prefix}_n": n,
                f"{prefix}_ci": [0.0, 1.0]}

    def row(label, method, strength, k=None, layers=None, harmful=(1, 10), harmless=(0, 10),
            **extra):
        return {"label": label, "method": method, "strength": strength, "k": k,
                "layers": layers, **rates("harmful", *harmful), **rates("harmless", *harmless),
                "harmful_refusal_score": -1.0, "ppl_general": 50.0, "kl_harmless": 0.2, **extra}

    result = {
        "baseline": row("unsteered", "none", 0.0, harmful=(8, 10)),
        "results": [row("ablate s=1", "ablate", 1.0),
                    row("actadd s=1.5", "actadd", 1.5, harmless=(5, 10)),
                    row("inlp_flip s=1 k=2", "inlp_flip", 1.0, 2, [3], harmful=(5, 10)),
                    row("inlp_flip s=1 k=2 layers=2,3", "inlp_flip", 1.0, 2, [2, 3])],
        "prompts": {"harmful": {"source": "h"}, "harmless": {"source": "l"}},
        "pack": {"selection_full": {"chosen": {"kl": 0.05}},
                 "calibration": {"actadd": {"strength": 1.5, "reached": True, "target": 0.8,
                                            "n_harmless_val": 16,
                                            "tried": [{"strength": 1.5,
                                                       "harmless_val_refusal": 0.9}]}}},
    }
    claims = {c["claim"][:20]: c for c in assess_claims(result, None)}
    ablate = next(c for c in claims.values() if c["claim"].startswith("Directional"))
    assert ablate["reproduced"] is False and "KL 0.200 on l" in ablate["why"]
    induce = next(c for c in claims.values() if c["claim"].startswith("Adding"))
    assert "1.5 → 90%" in induce["why"]
    flip = next(c for c in claims.values() if "about as well" in c["claim"])
    assert flip["reproduced"] is False and "layers [2, 3]" in flip["why"]
    assert all(c["why"] == "" for c in claims.values() if c["reproduced"] is not False)
    share = dim_in_inlp_span(tiny_pack)
    assert 0.0 <= share["share"] <= 1.0 + 1e-9
    ref = {"pack_created": "t", "k_max": 2, "layer": 3, "template_positions": 5,
           "harmful": {"source": "harmful_val", "n": 10}, "harmless": {"source": "l", "n": 10},
           "max_new_tokens": 8, "general_text": {"tokens": 40}, "decision": "kept midpoint",
           "rows": [{**row("", "none", 0.0), "variant": "unsteered"},
                    {**row("", "inlp_flip", 1.0, 2), "variant": "midpoint",
                     "general_positions_moved": 0.25},
                    {**row("", "ablate", 1.0, None, [0, 1]), "variant": "sites"}]}
    text = "\n".join(_reference_section(ref))
    assert "| midpoint | inlp_flip | 2 |" in text and "25%" in text
    assert "every layer's writes" in text and "kept midpoint" in text


def test_report_renders_again_from_its_results(tiny_lm, tiny_pack, tmp_path):
    from steering.reports.report import (
        ReportConfig,
        render_again,
        report_eval_config,
        run_report,
    )

    config = ReportConfig(eval=report_eval_config(**TINY, ks=(1,), cache_dir=str(tmp_path)),
                          n_geometry=4, command="steer report --out X")
    out = tmp_path / "report"
    first = run_report(tiny_lm, tiny_pack, out, config)
    md = (out / "report.md").read_text()
    (out / "notes.md").write_text("Sizes reduced for the shared machine.")
    again = render_again(out)
    md2 = (out / "report.md").read_text()
    assert "## Notes on this run" in md2 and "Sizes reduced" in md2
    assert md2.replace("## Notes on this run\n\nSizes reduced for the shared machine.\n\n", "") \
        == md
    assert again["claims"] == first["claims"]
    assert json.loads((out / "results.json").read_text())["wall_seconds"] == \
        first["wall_seconds"]
    # --render-only --capability: a server HumanEval run attached to the finished run's rows
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps({"precision": "int8", "rows": [
        {"setting": "none", "steering": None, "benchmark": "HumanEval", "passed": 4, "n": 8,
         "pass_at_1": 0.5, "ci": [0.2, 0.8]}]}))
    attached = render_again(out, str(cap), tiny_pack)
    assert attached["evaluation"]["baseline"]["capability"]["passed"] == 4
    assert attached["evaluation"]["capability_source"]["matched"] == {"none": "none"}
    assert "capability" in json.loads((out / "results.json").read_text())["evaluation"][
        "baseline"]
    other = dataclasses.replace(tiny_pack, meta={**(tiny_pack.meta or {}), "created": "x"})
    with pytest.raises(ValueError, match="created"):
        render_again(out, str(cap), other)


def test_inlp_zero_position_is_where_the_raw_origin_variant_puts_the_harmful_mean(tiny_pack):
    from steering.reports.report import inlp_zero_position

    zero = inlp_zero_position(tiny_pack)
    layer = zero["layer"]
    p = tiny_pack._pos_index(None)
    mu_h = tiny_pack.mean_harmful[layer, p].double()
    mu_l = tiny_pack.mean_harmless[layer, p].double()
    q = tiny_pack.inlp[layer].directions.double()
    assert len(zero["positions"]) == q.shape[0]
    # On direction i, the point at fraction t_i of the way from μ⁻ to μ⁺ has coordinate 0.
    for qi, t in zip(q, zero["positions"]):
        gap = abs(float(qi @ (mu_h - mu_l)))
        assert abs(float(qi @ (mu_l + t * (mu_h - mu_l)))) < 1e-2 * gap


def test_a_server_humaneval_run_lands_on_the_rows_with_the_same_steering(tiny_pack):
    """`steer report --capability FILE`: the server run's settings resolve against the pack
    (INLP k defaults to the pack's maximum) to the report's labels; conditional settings have
    no row and are kept beside."""
    from steering.evaluation.evaluate import spec_label
    from steering.reports.report import attach_capability, report_grid

    k_max = tiny_pack.max_k()
    results = [{"label": "unsteered"}] + [{"label": spec_label(s)}
                                          for s in report_grid(tiny_pack)]

    def row(setting, steering, passed, **extra):
        return {"setting": setting, "steering": steering, "benchmark": "HumanEval",
                "passed": passed, "n": 10, "pass_at_1": passed / 10, "ci": [0.0, 1.0], **extra}

    run = {"precision": "int8", "mode": "server", "max_new_tokens": 384, "rows": [
        row("none", None, 5), row("inlp_flip", {"method": "inlp_flip", "strength": 1.0}, 6),
        row("actadd s=1", {"method": "actadd", "strength": 1.0}, 3),
        row("ablate below", {"method": "ablate", "strength": 1.0, "when": {"below": 0.4}}, 5,
            condition_applied=10)]}
    src = attach_capability(results, run, tiny_pack, "cap.json")
    by = {r["label"]: r for r in results}
    assert by["unsteered"]["capability"]["passed"] == 5
    assert by[f"inlp_flip s=1 k={k_max}"]["capability"]["pass_at_1"] == 0.6
    assert by["actadd s=1"]["capability"]["source"] == "server"
    assert "capability" not in by["ablate s=1"]
    assert src["matched"] == {"none": "none", "inlp_flip": f"inlp_flip s=1 k={k_max}",
                              "actadd s=1": "actadd s=1"}
    assert [o["setting"] for o in src["other_settings"]] == ["ablate below"]
