"""Lexical contrast prompts: harmless instructions that share words with the harmful ones.

A model aligned on refusals learns which words precede a refusal. When the harmless half of the SFT
set never contains those words ("steal one's thunder", "break a bad habit", "kill a process"), the
model refuses every prompt that does: XSTest's over-refusal. The contrast set is chosen from the
data, not by hand: every word is scored by how much more often it occurs in the SFT set's harmful
prompts than in the harmless pool (a smoothed log-odds ratio of document frequencies), and a
harmless prompt by its highest-scoring word.
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORD = re.compile(r"[a-z]{3,}")


def prompt_words(prompt: str) -> set[str]:
    """The distinct lower-case words of three letters or more in ``prompt``."""
    return set(WORD.findall(prompt.lower()))


def harm_lexicon(harmful: list[str], harmless: list[str], min_count: int = 3) -> dict[str, float]:
    """Each word of at least ``min_count`` harmful prompts, scored by the log-odds ratio of the share
    of harmful and of harmless prompts containing it (add-one-half smoothing):
    ``log((h_w + ½) / (H + 1)) − log((b_w + ½) / (B + 1))``. Positive: more typical of harmful prompts."""
    in_harmful = Counter(w for p in harmful for w in prompt_words(p))
    in_harmless = Counter(w for p in harmless for w in prompt_words(p))
    n_harmful, n_harmless = len(harmful) + 1, len(harmless) + 1
    return {w: math.log((c + 0.5) / n_harmful) - math.log((in_harmless[w] + 0.5) / n_harmless)
            for w, c in in_harmful.items() if c >= min_count}


def contrast_prompts(pool: list[str], lexicon: dict[str, float], n: int) -> list[dict]:
    """The ``n`` prompts of ``pool`` whose highest-scoring word scores highest (ties keep the pool's
    order), each with that word and its score. Prompts with no word in ``lexicon`` are never taken."""
    scored = []
    for index, prompt in enumerate(pool):
        words = [w for w in prompt_words(prompt) if w in lexicon]
        if words:
            word = max(sorted(words), key=lexicon.__getitem__)
            scored.append((-lexicon[word], index, prompt, word))
    scored.sort()
    return [{"prompt": prompt, "word": word, "score": round(-neg, 4)} for neg, _, prompt, word in scored[:n]]
