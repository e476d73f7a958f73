"""Cleaning the base model's own answers before they become training targets.

A small base model answering an Alpaca prompt often runs on past its answer: it opens a new
template turn (``### Explanation:``, ``### Response:``, ``### Instruction:`` ...) and repeats itself
until ``max_new_tokens`` cuts it mid-sentence. Trained on as they are (the SFT ends every target
with an eos), such answers teach the aligned model to write template markers and to stop
mid-sentence. :func:`trim_answer` keeps what the model answered:

1. the text before the first line that opens a Markdown heading of two or more ``#`` (the model
   starting a turn of its own); the answer ended there;
2. if no such line was found and the answer was cut by the token limit, the text up to its last
   complete sentence or line.
"""

from __future__ import annotations

import re

# a line that opens a heading of two or more '#': '### Response:', '## Step 1', ...
TEMPLATE_TURN = re.compile(r"(?:^|\n)[ \t]*#{2,}")
# the end of a sentence: . ! or ? after a letter or a closing bracket/quote (not '3.' of a numbered
# list), optionally followed by a closing quote or bracket, then whitespace or the end; or a line break
SENTENCE_END = re.compile(r"(?<=[^\d\s])[.!?][\"')\]]?(?=\s|$)|\n")


def cut_at_template_turn(text: str) -> tuple[str, bool]:
    """``text`` before the first line that opens a ``##``-or-deeper heading, stripped, and whether
    such a line was found."""
    match = TEMPLATE_TURN.search(text)
    if match is None:
        return text.strip(), False
    return text[:match.start()].strip(), True


def cut_to_last_sentence(text: str) -> str:
    """``text`` up to and including its last sentence end (or before its last line break), stripped;
    ``""`` when it has none."""
    ends = list(SENTENCE_END.finditer(text))
    if not ends:
        return ""
    last = ends[-1]
    return text[:last.start() if last.group() == "\n" else last.end()].strip()


def trim_answer(text: str, reached_limit: bool) -> tuple[str, str | None]:
    """The answer ``text`` trimmed as the module says, and what was done: ``"template_turn"`` (cut
    at a new template turn), ``"last_sentence"`` (cut by the token limit, cut back to its last
    sentence) or ``None`` (kept whole).

    Args:
        text: a generated answer.
        reached_limit: whether the generation stopped at ``max_new_tokens`` rather than at an eos.
    """
    answer, turned = cut_at_template_turn(text)
    if turned:
        return answer, "template_turn"
    if reached_limit:
        cut = cut_to_last_sentence(answer)
        return cut, ("last_sentence" if cut != answer else None)
    return answer, None
