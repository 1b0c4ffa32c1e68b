"""A prompt -> its pieces of text, each with a weight, and the chunk breaks (`BREAK`): the web UIs' syntax.

With weighting: `(text)` multiplies the weight of its text by 1.1, `[text]` divides it by 1.1, `(text:1.5)` multiplies
it by 1.5, nested brackets multiply, and `\\(` `\\)` `\\[` `\\]` `\\\\` stand for the characters themselves. A bracket
without its partner stays in the text as a literal character (logged once per prompt). Without weighting the text
is taken as it is, brackets included. In both, a standalone upper-case `BREAK` ends the current chunk.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import regex

logger = logging.getLogger(__name__)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
_BREAK = regex.compile(r"\s*\bBREAK\b\s*")
_SYNTAX = regex.compile(r"""
    \\(?P<escaped>[()\[\]\\])                                       # an escaped bracket or backslash
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)                 # the end of (text:1.5)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|[\\:])
""", regex.VERBOSE)


@dataclass
class Segment:
    """A piece of a prompt and the weight of its tokens; `is_break` marks a `BREAK` (no text, no weight)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_prompt(prompt: str, weighting: bool) -> list[Segment]:
    """The segments of `prompt`: runs of text with one weight (neighbours of equal weight merged), and breaks.
    An empty prompt gives one empty segment."""
    segments = _weighted_segments(prompt) if weighting else _text_segments(prompt, 1.0)
    merged: list[Segment] = []
    for segment in segments:
        if not segment.is_break and not segment.text:
            continue
        if merged and not segment.is_break and not merged[-1].is_break and merged[-1].weight == segment.weight:
            merged[-1].text += segment.text
        else:
            merged.append(segment)
    return merged or [Segment("")]


def _text_segments(text: str, weight: float) -> list[Segment]:
    """`text` split at its `BREAK`s."""
    segments: list[Segment] = []
    for index, part in enumerate(_BREAK.split(text)):
        if index:
            segments.append(Segment("", is_break=True))
        segments.append(Segment(part, weight))
    return segments


def _weighted_segments(prompt: str) -> list[Segment]:
    segments: list[Segment] = []
    open_brackets: dict[str, list[int]] = {"(": [], "[": []}  # bracket -> indices of its open segments
    unbalanced = False

    def multiply_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment.weight *= factor

    for match in _SYNTAX.finditer(prompt):
        if match["escaped"]:
            segments.append(Segment(match["escaped"]))
        elif match["open"]:
            open_brackets[match["open"]].append(len(segments))
            segments.append(Segment(match["open"]))  # literal until its partner closes it
        elif match["weight"] is not None and open_brackets["("]:
            start = open_brackets["("].pop()
            segments[start].text = ""
            multiply_from(start, float(match["weight"]))
        elif match["close"] and open_brackets["(" if match["close"] == ")" else "["]:
            start = open_brackets["(" if match["close"] == ")" else "["].pop()
            segments[start].text = ""
            multiply_from(start, ROUND_MULTIPLIER if match["close"] == ")" else SQUARE_MULTIPLIER)
        elif match["text"]:
            segments.extend(_text_segments(match["text"], 1.0))
        else:  # a closing bracket without its opening one, kept as text
            unbalanced = True
            segments.append(Segment(match[0]))
    if unbalanced or any(open_brackets.values()):
        _warn_unbalanced(prompt)
    return segments


def shortened(prompt: str, length: int = 60) -> str:
    """`prompt` for a log line: quoted, cut after `length` characters."""
    return repr(prompt if len(prompt) <= length else prompt[:length] + "...")


@functools.lru_cache(maxsize=None)
def _warn_unbalanced(prompt: str) -> None:
    logger.warning("unbalanced brackets in the prompt %s: the brackets without a partner are kept as literal text "
                   "(write \\( \\) \\[ \\] for brackets meant as text)", shortened(prompt))
