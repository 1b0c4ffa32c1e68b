"""The emphasis syntax (ldm.prompts.parsing) against weights computed by hand, and the web UIs' rescaling of the
weighted encoder output (ldm.prompts.weighting) by hand and on a small model."""
from __future__ import annotations

import logging

import pytest
import torch

from ldm.prompts import encode_prompt_pair
from ldm.prompts.parsing import parse_prompt
from ldm.prompts.weighting import emphasize
from tests.model_factory import random_tiny_model

UP, DOWN = 1.1, 1 / 1.1

# prompt -> segments (text, weight), "BREAK" for a chunk break; weights multiplied out by hand.
TABLE = [
    ("a red circle", [("a red circle", 1.0)]),
    ("", [("", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", UP), (" circle", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", DOWN), (" circle", 1.0)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("( a : 0.25 )", [(" a ", 0.25)]),
    ("(a:-1)", [("a", -1.0)]),
    ("[[a]]", [("a", DOWN * DOWN)]),
    ("((a))", [("a", UP * UP)]),
    ("((a:1.5) b)", [("a", 1.5 * UP), (" b", UP)]),
    ("(a [b] c)", [("a ", UP), ("b", DOWN * UP), (" c", UP)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    ("(a:x)", [("a:x", UP)]),
    ("(a:1.2.3)", [("a:1.2.3", UP)]),
    ("\\(a\\) [b\\]]", [("(a) ", 1.0), ("b]", DOWN)]),
    ("a\\\\b \\c", [("a\\b \\c", 1.0)]),
    # unbalanced: the bracket without a partner stays as text (AUTOMATIC1111 instead weights the text after an
    # unclosed "(" by 1.1; ComfyUI keeps it as text)
    ("a (b", [("a (b", 1.0)]),
    ("a) b", [("a) b", 1.0)]),
    ("(a:1.5", [("(a:1.5", 1.0)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),
    ("((a) b", [("(", 1.0), ("a", UP), (" b", 1.0)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a (", 1.0), ("house", 1.3 * UP), (" ", 1.0), ("on", DOWN), (" a ", 1.0), ("hill", 0.5), (", sun, ", 1.0),
      ("sky", UP ** 3), (".", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), "BREAK", ("b", 1.0)]),
    ("a (b:1.2) BREAK [c]", [("a ", 1.0), ("b", 1.2), "BREAK", ("c", DOWN)]),
    ("(a BREAK b)", [("a", UP), "BREAK", ("b", UP)]),
    ("BREAK", ["BREAK"]),
    ("a BREAKfast break", [("a BREAKfast break", 1.0)]),
]


def readable(segments):
    return ["BREAK" if s.is_break else (s.text, pytest.approx(s.weight, rel=1e-12)) for s in segments]


@pytest.mark.parametrize("prompt, expected", TABLE, ids=[row[0] or "empty" for row in TABLE])
def test_weights_of_the_emphasis_syntax(prompt, expected):
    assert readable(parse_prompt(prompt, weighting=True)) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a (red:1.5) [circle] \\(", [("a (red:1.5) [circle] \\(", 1.0)]),
    ("a (b BREAK c)", [("a (b", 1.0), "BREAK", ("c)", 1.0)]),
    ("", [("", 1.0)]),
])
def test_without_weighting_brackets_are_text_and_break_still_breaks(prompt, expected):
    assert readable(parse_prompt(prompt, weighting=False)) == expected


def test_unbalanced_brackets_are_logged_once_per_prompt(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.prompts.parsing"):
        for _ in range(3):
            parse_prompt("an (unbalanced prompt for the log test", weighting=True)
        parse_prompt("a balanced (prompt) for the log test", weighting=True)
        parse_prompt("another] unbalanced prompt for the log test", weighting=True)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("unbalanced brackets in the prompt 'an (unbalanced prompt")


def test_rescaling_by_hand():
    z = torch.tensor([[[1.0, 3.0], [2.0, 2.0]],
                      [[1.0, 3.0], [2.0, 2.0]]])
    weights = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    # row 0: weighted [[1, 3], [1, 1]] has mean 1.5, the original mean is 2: everything times 4/3
    expected = torch.tensor([[[4 / 3, 4.0], [4 / 3, 4 / 3]],
                             [[1.0, 3.0], [2.0, 2.0]]])
    out = emphasize(z, weights)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[1], z[1])  # a row without weights is untouched
    ones = torch.ones(1, 4, 2)
    torch.testing.assert_close(emphasize(ones, torch.tensor([[1.0, 2.0, 1.0, 1.0]]))[0, :, 0],
                               torch.tensor([0.8, 1.6, 0.8, 0.8]))  # weighted mean 1.25 -> times 0.8


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=4)


def test_weighted_conditioning_on_a_small_model(model):
    c, uc = encode_prompt_pair(model, ["a (red:1.5) [circle]"], [""], weighting=True)
    with torch.no_grad():
        z = model.get_learned_conditioning(["a red circle"])  # the same tokens: a, red, circle
        empty = model.get_learned_conditioning([""])
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1  # after the start token: a, red, circle
    weighted = z * weights[:, None]
    expected = weighted * (z.mean() / weighted.mean())
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(uc, empty)
    torch.testing.assert_close(c.mean(), z.mean())


def test_each_chunk_keeps_its_own_mean(model):
    prompt = "cat " * 75 + "(red:2) cat"
    c, _ = encode_prompt_pair(model, [prompt], None, weighting=True)
    with torch.no_grad():
        first, second = (model.get_learned_conditioning([text]) for text in ("cat " * 75, "red cat"))
    assert torch.equal(c[:, :77], first)
    weights = torch.ones(77)
    weights[1] = 2.0
    weighted = second * weights[:, None]
    torch.testing.assert_close(c[:, 77:], weighted * (second.mean() / weighted.mean()), rtol=1e-6, atol=1e-6)
