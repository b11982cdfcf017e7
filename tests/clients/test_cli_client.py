"""`steer chat` and `steer compare` against the tiny-model server on a loopback port."""

from __future__ import annotations

import io

import pytest

from clients.cli import parse_variant, render_table
from server.cli import main
from testkit.live import app_url

Q = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def url(tiny_lm, tiny_pack):
    with app_url(tiny_lm, tiny_pack, max_tokens_limit=64) as base:
        yield base


def test_parse_variant():
    assert parse_variant("no-refusal") == "no-refusal"
    assert parse_variant("inlp_flip:0.5:2") == {"method": "inlp_flip", "strength": 0.5, "k": 2,
                                                "label": "inlp_flip:0.5:2"}
    assert parse_variant("ablate") == {"method": "ablate", "label": "ablate"}
    with pytest.raises(ValueError):
        parse_variant("bogus:1")


def test_parse_variant_lists_targeting_conditions():
    assert parse_variant("ablate+actadd:4,generation,above=0.5") == {
        "label": "ablate+actadd:4,generation,above=0.5",
        "steering": [{"method": "ablate"}, {"method": "actadd", "strength": 4.0,
                                            "apply_to": "generation", "when": {"above": 0.5}}]}
    assert parse_variant("actadd:2,window=3-") == {"method": "actadd", "strength": 2.0,
                                                   "generation_window": [3, None],
                                                   "label": "actadd:2,window=3-"}
    assert parse_variant("no-refusal,prompt") == {"preset": "no-refusal", "apply_to": "prompt",
                                                  "label": "no-refusal,prompt"}
    for bad in ("actadd,window=3", "actadd,when-pack=x", "ablate+no-refusal", "actadd,nope"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_compare_lists_and_conditions(url, capsys):
    rc = main(["compare", "--url", url, "--max-tokens", "4", "--width", "160",
               "-v", "none", "-v", "ablate+actadd:2,window=0-2", "-v", "actadd:2,above=-50", Q])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ablate 1 + actadd 2 tokens 0-2" in out and "score" in out and " on" in out


def test_chat_steer_option(url, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q}\n"))
    assert main(["chat", "--url", url, "--max-tokens", "3", "--steer",
                 "ablate+actadd:1,generation,below=50"]) == 0
    assert capsys.readouterr().out.strip()


def test_render_table_fits_width():
    table = render_table([(["[0] a"], "x " * 50), (["[1] b"], "short")], 60)
    assert all(len(line) <= 60 for line in table.splitlines())
    assert "[1] b" in table and "short" in table


def test_compare_prints_side_by_side(url, capsys):
    rc = main(["compare", "--url", url, "--max-tokens", "5", "--width", "100",
               "-v", "none", "-v", "actadd:2", "-v", "no-refusal", Q])
    out = capsys.readouterr().out
    assert rc == 0
    head = next(line for line in out.splitlines() if "[0]" in line)
    assert "[1] actadd:2" in head and "[2] no-refusal" in head  # one row, three columns
    assert "seed" in out
    assert all(len(line) <= 100 for line in out.splitlines())


def test_compare_bad_variant_exit_code(url, capsys):
    rc = main(["compare", "--url", url, "--max-tokens", "4", "-v", "none", "-v", "actadd:99", Q])
    assert rc == 1
    assert "variants[1]" in capsys.readouterr().err


def test_chat_piped_lines(url, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q}\n\nSecond question?\n"))
    rc = main(["chat", "--url", url, "--max-tokens", "4", "--method", "ablate"])
    out = capsys.readouterr().out
    assert rc == 0
    assert len([line for line in out.splitlines() if line.strip()]) >= 1


def test_chat_error_exit_code(url, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q}\n"))
    rc = main(["chat", "--url", url, "--preset", "no-such-preset", "--max-tokens", "4"])
    assert rc == 1
    assert "no-such-preset" in capsys.readouterr().err
