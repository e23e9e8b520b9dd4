"""A small Dockerfile reader for the deploy tests: stages, instructions with continuation lines joined, ARG
defaults, and exec-form (JSON) arguments. Enough for the repository's own Dockerfile, not a general parser."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """JSON-array arguments (ENTRYPOINT, CMD, HEALTHCHECK ... CMD [...]), or shell words otherwise."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :].strip()
        if text.startswith("["):
            return json.loads(text)
        return shlex.split(text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        [stage] = [s for s in self.stages if s.name == name]
        return stage

    def resolve(self, text: str) -> str:
        """${ARG} / $ARG substituted with the global ARG defaults (repeatedly: defaults may name other ARGs)."""
        for _ in range(10):
            expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.global_args.get(m[1] or m[2]) or m[0], text)
            if expanded == text:
                return text
            text = expanded
        return text


def logical_lines(text: str) -> list[str]:
    """Instructions with backslash continuations joined; comments and blank lines dropped (also inside a
    continued instruction, as Docker does)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif keyword == "ARG" and not stages:
            key, eq, default = arguments.partition("=")
            global_args[key] = default if eq else None
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return Dockerfile(global_args, stages)
