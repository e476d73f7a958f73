"""Lexical contrast prompts: harmless instructions that share words with the harmful ones.

A model aligned on refusals learns which words precede a refusal. When the harmless half of the SFT
set never contains those words ("steal one's thunder", "break a bad habit", "kill a process"), the
model refuses every prompt that does: XSTest's over-refusal. The contrast set is chosen from the
data, not by hand: every word is scored by how much more often it occurs in the SFT set's harmful
prompts than in the harmless pool (a smoothed log-odds ratio of document frequencies), and a
harmless prompt by its highest-scoring word (``max``) or by the mean over its words (``mean``).
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORD = re.compile(r"[a-z]{3,}")


def prompt_words(prompt: str) -> set[str]:
    """The distinct lower-case words of three letters or more in ``prompt``."""
    return set(WORD.findall(prompt.lower()))


def log_odds(harmful: list[str], harmless: list[str]) -> dict[str, tuple[float, int]]:
    """Every word of either set: its log-odds ratio between the share of harmful and of harmless prompts
    containing it (add-one-half smoothing), ``log((h_w + ½) / (H + 1)) − log((b_w + ½) / (B + 1))``,
    and the number ``h_w`` of harmful prompts containing it. Positive: more typical of harmful prompts."""
    in_harmful = Counter(w for p in harmful for w in prompt_words(p))
    in_harmless = Counter(w for p in harmless for w in prompt_words(p))
    n_harmful, n_harmless = len(harmful) + 1, len(harmless) + 1
    return {w: (math.log((in_harmful[w] + 0.5) / n_harmful) - math.log((in_harmless[w] + 0.5) / n_harmless),
                in_harmful[w]) for w in in_harmful.keys() | in_harmless.keys()}


def lexicon_of(odds: dict[str, tuple[float, int]], min_count: int) -> dict[str, float]:
    """The log-odds of each word of :func:`log_odds` found in at least ``min_count`` harmful prompts."""
    return {w: score for w, (score, count) in odds.items() if count >= min_count}


def harm_lexicon(harmful: list[str], harmless: list[str], min_count: int = 3) -> dict[str, float]:
    """The :func:`log_odds` of each word of at least ``min_count`` harmful prompts."""
    return lexicon_of(log_odds(harmful, harmless), min_count)


SCORES = ("max", "mean")
"""How a prompt is scored from its words: ``max``, its most harm-typical word of the lexicon (the
prompts that share a marked word); ``mean``, the mean log-odds of all its words (the prompts that
read most like the harmful ones as a whole, their form included: short questions such as "How can
I ...?")."""


def prompt_score(prompt: str, odds: dict[str, float], how: str) -> tuple[float, str] | None:
    """``prompt``'s score under ``how`` (see :data:`SCORES`) and the word that scores highest, or None
    when no word of it is in ``odds``."""
    words = sorted(w for w in prompt_words(prompt) if w in odds)
    if not words:
        return None
    word = max(words, key=odds.__getitem__)
    return (odds[word] if how == "max" else sum(odds[w] for w in words) / len(words)), word


def contrast_prompts(pool: list[str], odds: dict[str, float], n: int, how: str = "max") -> list[dict]:
    """The ``n`` prompts of ``pool`` that score highest under ``how`` (ties keep the pool's order), each
    with its score and its most harm-typical word. Prompts with no word in ``odds`` are never taken."""
    if how not in SCORES:
        raise ValueError(f"unknown contrast score '{how}'; use one of {SCORES}")
    scored = []
    for index, prompt in enumerate(pool):
        found = prompt_score(prompt, odds, how)
        if found is not None:
            scored.append((-found[0], index, prompt, found[1]))
    scored.sort()
    return [{"prompt": prompt, "word": word, "score": round(-neg, 4)} for neg, _, prompt, word in scored[:n]]
