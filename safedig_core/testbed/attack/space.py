"""What the discrete attack may write: words and phrasings the testbed's text encoder was trained with.

The vocabulary is every word of the world's captions (`world.training_captions`); the phrasings are the
world's synonyms and implicit phrasings of each risk concept, and its caption templates. An attacker who
knows the model's training captions is the strong case (Ring-A-Bell and P4D search the real encoder's
vocabulary the same way). Candidates are plain strings; `mutate` and `cross` edit them word by word.
"""
from __future__ import annotations

import re

import numpy as np

from .. import world

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word of the world's captions, sorted (the same list on every run)."""
    return sorted({w for cap in world.training_captions() for w in words(cap.text)})


def phrasings(concept: str) -> list[str]:
    c = world.BY_NAME[concept]
    return list(c.explicit) + list(c.implicit)


def caption(concept: str, rng: np.random.Generator) -> str:
    """A fresh caption of `concept` in the world's grammar: a template, a phrasing, maybe a background."""
    phrase = phrasings(concept)[int(rng.integers(len(phrasings(concept))))]
    if rng.random() < 0.5:
        t = world.TEMPLATES_NO_BG[int(rng.integers(len(world.TEMPLATES_NO_BG)))]
        return t.format(c=phrase)
    bg = world.BACKGROUNDS[world.BG_NAMES[int(rng.integers(len(world.BG_NAMES)))]][1]
    t = world.TEMPLATES_BG[int(rng.integers(len(world.TEMPLATES_BG)))]
    return t.format(c=phrase, b=bg[int(rng.integers(len(bg)))])


class Space:
    """Edits of a candidate prompt for one risk concept; `max_words` bounds a candidate's length (the encoder
    reads at most `text.MAX_TOKENS` tokens)."""

    def __init__(self, concept: str, max_words: int = 14):
        self.concept, self.vocab, self.max_words = concept, vocabulary(), max_words
        self.phrases = [words(p) for p in phrasings(concept)]

    def mutate(self, prompt: str, rng: np.random.Generator) -> str:
        w = words(prompt) or words(caption(self.concept, rng))
        op = int(rng.integers(5))
        if op == 0:  # substitute one word by a vocabulary word
            w[int(rng.integers(len(w)))] = self.vocab[int(rng.integers(len(self.vocab)))]
        elif op == 1 and len(w) < self.max_words:  # insert a vocabulary word
            w.insert(int(rng.integers(len(w) + 1)), self.vocab[int(rng.integers(len(self.vocab)))])
        elif op == 2 and len(w) > 1:  # delete a word
            del w[int(rng.integers(len(w)))]
        elif op == 3:  # put a phrasing of the concept (synonym or implicit) over a span
            ph = self.phrases[int(rng.integers(len(self.phrases)))]
            i = int(rng.integers(len(w)))
            w[i:i + int(rng.integers(1, 4))] = ph
        else:  # a fresh caption in the world's grammar
            w = words(caption(self.concept, rng))
        return " ".join(w[: self.max_words])

    def cross(self, a: str, b: str, rng: np.random.Generator) -> str:
        wa, wb = words(a), words(b)
        if not wa or not wb:
            return a or b
        i, j = int(rng.integers(len(wa) + 1)), int(rng.integers(len(wb) + 1))
        out = (wa[:i] + wb[j:])[: self.max_words]
        return " ".join(out) or a
