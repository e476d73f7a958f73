"""Lexical contrast prompts: harmless instructions that share words with the harmful ones.

A model aligned on refusals learns which words precede a refusal. When the harmless half of the SFT
set never contains those words ("steal one's thunder", "break a bad habit", "kill a process"), the
model refuses every prompt that does: XSTest's over-refusal. The contrast set is chosen from the
data, not by hand: every word is scored by how much more often it occurs in the SFT set's harmful
prompts than in the harmless pool (a smoothed log-odds ratio of document frequencies), and a
harmless prompt by its highest-scoring word (``max``) or by the mean over its words (``mean``).

A third kind (``question``) contrasts the harmful prompts' *form* rather than their words: the harmful
prompts are users' first-person questions ("How can I ...?"), the harmless instructions mostly
imperatives ("Suggest three ways to ..."), so a model aligned on both can learn to refuse the
question form itself ("How can I slash my travel costs?"). :func:`as_question` recasts the harmless
instructions that ask for a way or for advice as such questions, by a fixed rule on their wording.
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
I ...?"). The ``question`` kind scores nothing: see :func:`question_prompts`."""

_STRIP = re.compile(r"[\s.?!:]+$")
_HOW = re.compile(r"^(?:please\s+)?(?:explain|describe|tell me|show me|outline|teach me)\s+how\s+"
                  r"(?P<lead>to|you can|one can|I can|can I|you should|one should|I should|do you|do I)"
                  r"\s+(?P<rest>.+)$", re.I)
_WAYS = re.compile(r"^(?:please\s+)?(?:suggest|list|give|provide|generate|name|come up with|brainstorm|propose|"
                   r"recommend|identify|find|offer|share)(?:\s+me)?(?:\s+a list of)?"
                   r"(?:\s+(?:a|an|one|two|three|four|five|six|seven|eight|nine|ten|some|several|a few|"
                   r"a couple of|\d+))?"
                   r"(?:\s+(?:creative|practical|effective|good|simple|easy|different|possible|useful|unique|new|"
                   r"great|helpful|specific|innovative|key|important|alternative))*"
                   r"\s+(?P<noun>ways?|tips?|methods?|strategies|strategy|steps?|ideas?|techniques?|suggestions?|"
                   r"advice|approaches|approach|solutions?)\s+(?P<prep>to|on how to|of how to|for how to|for|on)\s+"
                   r"(?P<rest>.+)$", re.I)
_ALREADY = re.compile(r"^(?:how (?:do|can|should|would|could) (?:i|we)|what(?: is|'s| are) (?:the best|some|a good)"
                      r" ways? to)\b", re.I)
_PLURAL = {"way": "ways", "tip": "tips", "method": "methods", "strategy": "strategies", "step": "steps",
           "idea": "ideas", "technique": "techniques", "suggestion": "suggestions", "approach": "approaches",
           "solution": "solutions"}
_DETERMINERS = {"the", "a", "an", "this", "these", "that", "those", "some", "my", "our", "their", "its", "his",
                "her"}
_SECOND_PERSON = [(re.compile(r"\byourself\b", re.I), "myself"), (re.compile(r"\byours\b", re.I), "mine"),
                  (re.compile(r"\byour\b", re.I), "my")]


def _first_person(text: str) -> str:
    for pattern, word in _SECOND_PERSON:
        text = pattern.sub(word, text)
    return text


def as_question(instruction: str) -> str | None:
    """``instruction`` recast as a user's first-person question, or None when no rule applies.

    "Explain how to use a pressure cooker." -> "How do I use a pressure cooker?";
    "Suggest three ways to save energy at your home." -> "How can I save energy at my home?";
    "Give two tips for consuming more vegetables." -> "What are some good tips for consuming more
    vegetables?"; a question that already reads so ("How can I ...?") is kept as it is. Instructions
    with an input, several lines or several sentences are never recast."""
    text = instruction.strip()
    if "\n" in text or re.search(r"[.?!]\s+\S", text):
        return None
    if _ALREADY.match(text):
        return text
    text = _STRIP.sub("", text)
    if found := _HOW.match(text):
        lead = found["lead"].lower()
        verb = "can" if lead in ("you can", "one can", "i can", "can i") else (
            "should" if "should" in lead else "do")
        return f"How {verb} I {_first_person(found['rest'])}?"
    if found := _WAYS.match(text):
        rest = _first_person(found["rest"])
        first = rest.split()[0].lower()
        noun_phrase = first in _DETERMINERS or (first.endswith("ing") and first not in ("bring", "sing"))
        if found["prep"].lower() in ("for", "on") or noun_phrase:
            noun = found["noun"].lower()
            if noun == "advice":
                return f"What is some good advice {found['prep'].lower()} {rest}?"
            return f"What are some good {_PLURAL.get(noun, noun)} {found['prep'].lower()} {rest}?"
        return f"How can I {rest}?"
    return None


def question_prompts(pool: list[str], n: int) -> list[dict]:
    """The first ``n`` prompts of ``pool`` that :func:`as_question` recasts, recast, each with the
    instruction it came from."""
    picked = []
    for prompt in pool:
        if len(picked) == n:
            break
        if (question := as_question(prompt)) is not None:
            picked.append({"prompt": question, "source": prompt})
    return picked


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
