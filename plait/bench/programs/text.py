"""Synthetic stand-ins for the paper's datasets: seeded English-like text of a chosen length.

Nothing is downloaded. Text is drawn from common English words, each a single token (with its
leading space) in byte-level BPE vocabularies such as the default model's, so a passage of n
words is close to n tokens; the benchmark reports the tokens each engine actually counted.
Every piece of text comes from a seed, so two runs with different seeds share no prefix by
accident and a run never finds the previous run's text in the cache.

`use_vocabulary("synthetic")` draws the words `w10` ... `w2009` instead: the word-level tokenizer
written for dummy-weight runs (scripts/gpu/make_tokenizer.py) knows those and no English word, so
English text would become one unknown token repeated, every prompt alike.
"""

from __future__ import annotations

import random

ENGLISH = tuple(dict.fromkeys("""
the of and to in is was for that with as on by at from his her their this which are were be had
have has not but they all one two three new first more other some time people year day world city
state school work life house water place system part number group family country river market
story music food game team night room book road field power money light war history church town
land land king army company plan report study party case point week month area line side head
hand eye face home law word child woman man mother father friend member student teacher doctor
early late long short small large great high old young good best better same different open
close free full hard easy clear simple strong local public private social national general
north south east west red green blue black white dark bright warm cold quiet loud fast slow
made found called took gave said told came went saw knew thought wanted used asked began kept
left held turned moved lived played brought built wrote read ran sat stood grew fell rose won
lost paid sent met led set put cut let bring make find give take tell come show keep hold turn
move live play build write run grow win pay send meet lead watch learn change follow stop speak
open walk carry pass raise reach remain serve help start answer question reason result change
problem method idea fact form level order course process value price model service energy
health office table paper letter window garden bridge station street island mountain forest
valley ocean lake hill stone tree flower bird horse animal ship train plane car wheel engine
machine tool metal glass wood paper cloth bread milk fruit apple salt sugar coffee wine
""".split()))


VOCABULARIES = {"english": ENGLISH, "synthetic": tuple(f"w{i}" for i in range(10, 2010))}
_words = ENGLISH


def use_vocabulary(name: str) -> None:
    """Draw text from this vocabulary from now on (english or synthetic)."""
    global _words
    if name not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name!r}: choose from {', '.join(VOCABULARIES)}")
    _words = VOCABULARIES[name]


def _capital(word: str) -> str:
    return word.capitalize() if _words is ENGLISH else word


def rng_for(seed: int, *keys: object) -> random.Random:
    """A generator for one item of one run: the same (seed, keys) always gives the same text."""
    return random.Random(":".join(map(str, (seed, *keys))))


def words(rng: random.Random, n: int) -> str:
    """About n tokens of sentence-shaped text (capitalised, 6-16 words a sentence)."""
    out: list[str] = []
    while len(out) < n:
        sentence = rng.choices(_words, k=min(rng.randint(6, 16), n - len(out)))
        sentence[0] = _capital(sentence[0])
        sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)


def between(rng: random.Random, low: int, high: int) -> str:
    """Text of a length drawn uniformly from [low, high] tokens."""
    return words(rng, rng.randint(low, high))


def name(rng: random.Random) -> str:
    """A made-up proper name (two capitalised words)."""
    return " ".join(_capital(rng.choice(_words)) for _ in range(2))
