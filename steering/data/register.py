"""The measurement that goes with the shipped register set: how casual a text reads.

`casual_score(text)` = 100 × (casual markers − formal markers) / words. The markers are the
surface features that separate involved, conversational English from informational, formal
English in register studies (Biber 1988, dimension 1; Heylighen & Dewaele 2002 on formality):

| casual marker | example |
|---|---|
| contractions | it's, don't, you'll, I'm |
| discourse particles, greetings and slang | hey, yeah, gonna, kinda, lol, cool, awesome, dude, stuff |
| exclamation marks, emoticons and emoji | !, :), 😊 |

| formal marker | example |
|---|---|
| conjunctive adverbs | therefore, furthermore, moreover, consequently, thus, hence, additionally |
| formal verbs and phrases | ensure, utilize, regarding, kindly, shall, subsequently, it is recommended |

Positive: casual; around zero: neutral; negative: formal. It is a lexicon, not a classifier:
cheap, transparent, and blind to tone carried by syntax — enough to see a shift of register on a
set of answers, not to judge one sentence.
"""

from __future__ import annotations

import re

CONTRACTION = re.compile(r"\b[A-Za-z]+['’](?:s|re|ll|ve|d|t|m)\b", re.IGNORECASE)
CASUAL_WORDS = frozenset("""hey hi hiya yo yeah yep yup nope gonna wanna gotta kinda sorta lol
haha hehe omg btw cool awesome super totally dude buddy pal stuff okay ok guys folks chill
pretty tons lots cuz gotcha wow oh hmm""".split())
FORMAL_WORDS = frozenset("""therefore furthermore moreover consequently thus hence additionally
ensure utilize regarding kindly shall subsequently nevertheless accordingly whereas
henceforth""".split())
FORMAL_PHRASES = ("it is recommended", "it is important to", "in conclusion", "one should",
                  "it is advisable", "please note")
EMOTICON = re.compile(r"[:;]-?[)D(P]|[\U0001F300-\U0001FAFF\u2600-\u27BF]")
WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")


def marker_counts(text: str) -> dict[str, int]:
    words = [w.lower() for w in WORD.findall(text)]
    lowered = text.lower()
    casual = (len(CONTRACTION.findall(text)) + sum(w in CASUAL_WORDS for w in words)
              + text.count("!") + len(EMOTICON.findall(text)))
    formal = sum(w in FORMAL_WORDS for w in words) + sum(lowered.count(p) for p in FORMAL_PHRASES)
    return {"words": len(words), "casual": casual, "formal": formal}


def casual_score(text: str) -> float:
    """100 × (casual − formal markers) / words (0 for an empty text)."""
    c = marker_counts(text)
    return 100.0 * (c["casual"] - c["formal"]) / max(c["words"], 1)


def mean_casual_score(texts: list[str]) -> float:
    return sum(casual_score(t) for t in texts) / max(len(texts), 1)
