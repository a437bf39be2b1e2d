"""Read a Containerfile (Dockerfile syntax) into stages and instructions.

Only what tests/test_deploy_container.py runs: continuation lines, comments, ``FROM``
stages, ``RUN`` with its ``--mount`` flags, ``ENV K=V ...``, and the JSON (exec) forms
of ``CMD``, ``ENTRYPOINT`` and ``HEALTHCHECK ... CMD``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]

    def one(self, keyword: str) -> str:
        (found,) = self.all(keyword)
        return found

    def runs(self) -> list[list[list[str]]]:
        """Each RUN as its commands (split on ``&&``), each command as words; flags such
        as ``--mount=...`` before the command are left out."""
        result = []
        for rest in self.all("RUN"):
            words = shlex.split(rest)
            while words and words[0].startswith("--"):
                words.pop(0)
            commands: list[list[str]] = [[]]
            for word in words:
                if word == "&&":
                    commands.append([])
                else:
                    commands[-1].append(word)
            result.append(commands)
        return result

    def env(self) -> dict[str, str]:
        variables: dict[str, str] = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                variables[key] = value
        return variables

    def exec_form(self, keyword: str) -> list[str]:
        words: list[str] = json.loads(self.one(keyword))
        return words

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The HEALTHCHECK's options and its exec-form command."""
        options_text, _, command = self.one("HEALTHCHECK").partition(" CMD ")
        options = dict(word.removeprefix("--").split("=", 1) for word in options_text.split())
        words: list[str] = json.loads(command)
        return options, words


def parse(path: Path) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: the last instruction ends in a backslash"
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{path}: {keyword} before any FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages
