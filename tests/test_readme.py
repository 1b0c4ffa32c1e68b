"""The README's commands work as written: every script command line in its code blocks (and in its inline
code) parses with that script's own argument parser, the files it names from this repository exist, and the
commands that need no downloaded weights (the demo model's) run one after another in a fresh folder."""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.cli_support import script_env
from tests.model_factory import REPO_DIR

README = REPO_DIR / "README.md"
INTERPRETERS = ("python", "python3", ".venv/bin/python")
PLACEHOLDER = re.compile(r"<([^<>\n]+)>")  # <run>, <that run>: a name the reader fills in
PLACEHOLDER_MARK = "PLACEHOLDER-"
REPO_PATH_PREFIXES = ("configs/", "models/demo/", "scripts/")  # paths the clone itself must hold
# What a fresh clone has that the commands read; everything else they write lands in the test's folder.
CLONE_ENTRIES = ("configs", "ldm", "main.py", "models", "scripts")
# Arguments appended when a command runs, where running it as written would take minutes.
FASTER = {"scripts/evaluate_demo.py": ["--n", "4", "--batch_size", "4", "--steps", "10"],
          "scripts/evaluate_inpainting.py": ["--n", "2", "--batch_size", "2", "--steps", "3"],
          "scripts/evaluate.py": ["--n", "2", "--scales", "2,7", "--steps", "3", "--batch_size", "2"],
          "scripts/evaluate_embedding.py": ["--n", "1", "--steps", "3"]}
# Scripts that default to the demo model, and so run without downloaded weights.
DEMO_SCRIPTS = {"scripts/demo_concept_images.py", "scripts/evaluate_demo.py", "scripts/evaluate_inpainting.py"}


@dataclass(frozen=True)
class Command:
    """One script command line of the README."""

    line: int
    section: str
    interpreter: str
    script: str
    args: tuple[str, ...]
    in_block: bool  # in an indented or fenced block (else inline code in a paragraph)

    @property
    def runs_offline(self) -> bool:
        """Whether it needs no downloaded weights: the demo model's commands."""
        return self.in_block and ("--demo" in self.args or self.script in DEMO_SCRIPTS
                                  or any(arg.startswith("models/demo/") for arg in self.args))

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.section}): {shlex.join([self.script, *self.args])}"


def _fill_placeholders(text: str) -> str:
    return PLACEHOLDER.sub(lambda m: PLACEHOLDER_MARK + re.sub(r"\W+", "_", m.group(1)), text)


def _commands_in(text: str, line: int, section: str, in_block: bool) -> Iterator[Command]:
    """The script invocations of one shell command line (segments joined by && included)."""
    words = shlex.split(_fill_placeholders(text), comments=True)
    segment: list[str] = []
    for word in [*words, "&&"]:
        if word != "&&":
            segment.append(word)
            continue
        if len(segment) > 1 and segment[0] in INTERPRETERS and segment[1].endswith(".py"):
            yield Command(line, section, segment[0], segment[1], tuple(segment[2:]), in_block)
        segment = []


def readme_commands(text: str) -> list[Command]:
    """Every script command of a README: indented and fenced shell blocks (continuation lines joined,
    comments dropped) and inline code that starts with python."""
    commands: list[Command] = []
    section, fence, previous_blank, paragraph = "", None, True, []
    block: list[tuple[int, str]] = []

    def flush_block() -> None:
        joined, start = "", 0
        for number, content in block:
            start = start or number
            joined += content.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            commands.extend(_commands_in(joined, start, section, in_block=True))
            joined, start = "", 0
        block.clear()

    def flush_paragraph() -> None:
        text = "\n".join(content for _, content in paragraph)
        for match in re.finditer(r"`([^`]+)`", text):
            code = " ".join(match.group(1).split())
            if code.split(" ", 1)[0] in INTERPRETERS:
                number = paragraph[0][0] + text[:match.start()].count("\n")
                commands.extend(_commands_in(code, number, section, in_block=False))
        paragraph.clear()

    for number, content in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if content.strip().startswith("```"):
                fence = None
                flush_block()
            elif fence in ("", "sh", "bash", "shell", "console"):
                block.append((number, content))
            continue
        if content.strip().startswith("```"):
            flush_paragraph()
            fence = content.strip()[3:].strip()
            continue
        if content.startswith("    ") and (previous_blank or block):
            flush_paragraph()
            block.append((number, content.strip()))
            continue
        flush_block()
        if content.startswith("#"):
            flush_paragraph()
            section = content.lstrip("#").strip()
        elif content.strip():
            paragraph.append((number, content))
        else:
            flush_paragraph()
        previous_blank = not content.strip()
    flush_block()
    flush_paragraph()
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


class _Parsed(Exception):
    """Raised in place of returning from the argument parser, so that the script stops right there."""

    def __init__(self, namespace: argparse.Namespace, extras: list[str]):
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


def parse_only(command: Command, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, list[str]]:
    """Run the script's `main` with the command's arguments until its parser has read them; returns what the
    parser returned. A parser error (unknown or renamed flag, bad value) exits, as on the command line; flags
    must be written out in full (an abbreviation would still parse after the flag it shortens is renamed)."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self: argparse.ArgumentParser, args: Optional[list[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> None:
        self.allow_abbrev = False
        raise _Parsed(*original(self, args, namespace))

    def parse_args(self: argparse.ArgumentParser, args: Optional[list[str]] = None,
                   namespace: Optional[argparse.Namespace] = None) -> None:
        self.allow_abbrev = False
        namespace, extras = original(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed(namespace, [])

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put their folders on it
    name = "readme_" + Path(command.script).stem
    spec = importlib.util.spec_from_file_location(name, REPO_DIR / command.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(list(command.args))
    except _Parsed as parsed:
        return parsed.namespace, parsed.extras
    raise AssertionError(f"{command.script}'s main() returned without parsing its arguments")


def test_the_readme_has_the_commands_this_file_checks():
    scripts = {command.script for command in COMMANDS}
    assert {"scripts/txt2img.py", "scripts/img2img.py", "main.py", "scripts/merge_embeddings.py"} <= scripts
    running = {command.script for command in COMMANDS if command.runs_offline}
    assert {"scripts/txt2img.py", "scripts/img2img.py", "scripts/demo_concept_images.py"} <= running


def test_the_readme_says_where_python_comes_from():
    """Commands with a bare `python` need the virtual environment: the README says so before the first one."""
    text = README.read_text(encoding="utf-8")
    first_bare = min(command.line for command in COMMANDS if command.interpreter == "python")
    activation = [number for number, content in enumerate(text.splitlines(), start=1)
                  if content.strip() == ". .venv/bin/activate"]
    assert activation and activation[0] < first_bare, "say how to activate .venv before the first `python` command"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: f"line{command.line}-{Path(command.script).stem}")
def test_command_parses_with_its_scripts_parser(command, monkeypatch, capsys):
    assert (REPO_DIR / command.script).is_file(), f"{command}: no such script"
    for word in command.args:
        value = word.split("=", 1)[-1]
        if value.startswith(REPO_PATH_PREFIXES) and PLACEHOLDER_MARK not in value:
            assert (REPO_DIR / value).exists(), f"{command}: {value} is not in the repository"
    try:
        _, extras = parse_only(command, monkeypatch)
    except SystemExit as exit:
        pytest.fail(f"{command}: the parser refused it (exit {exit.code}): {capsys.readouterr().err.strip()}")
    # main.py reads what it does not know as config overrides, key=value: anything else is a stray word.
    assert all("=" in extra and not extra.startswith("-") for extra in extras), f"{command}: {extras} left over"


def test_demo_commands_run_one_after_another(tmp_path):
    """In a folder laid out as a fresh clone, each demo-model command runs as written (evaluate_demo.py on
    fewer prompts), in the README's order: later ones may read what earlier ones wrote."""
    for entry in CLONE_ENTRIES:
        (tmp_path / entry).symlink_to(REPO_DIR / entry)
    for command in (command for command in COMMANDS if command.runs_offline):
        args = [*command.args, *FASTER.get(command.script, [])]
        result = subprocess.run([sys.executable, command.script, *args], cwd=tmp_path, env=script_env(tmp_path),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command} failed:\n{result.stderr[-3000:]}"
