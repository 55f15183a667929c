"""The command line's parser: LightningCLI's, with jsonargparse's errors as one line each."""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from pytorch_lightning.cli import LightningArgumentParser


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def one_line(message: str) -> str:
    """jsonargparse's error (often a dozen lines about Union subtypes) as one line: the option,
    the value given and what it must be."""
    if "compute_fn" in message and " failed: " in message:  # our own message, raised in a link
        return message.split(" failed: ", 1)[1].strip()
    keys: list[str] = []
    lines = [line for line in message.splitlines() if line.strip()]
    while lines:  # down to the innermost problem: Parser key "data" > class_path > Parser key "batch_size"
        head = re.match(r'\s*(?:- )?Parser key "([^"]+)":\s*(.*)', lines[0])
        if head and head[2].startswith("Parser key"):  # 'Parser key "optimizer.lr": Parser key "optimizer": ...'
            lines[0] = head[2]
            continue
        if head:
            keys.append(head[1])
            if head[2]:  # 'Parser key "config": File does not exist: ...'
                return f"--{'.'.join(keys)}: {head[2]}"
            lines = lines[1:]
            continue
        nested = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
        if nested is None:
            break
        inner = lines[nested + 1 :]
        end = next((i for i, line in enumerate(inner) if _indent(line) <= _indent(lines[nested])), len(inner))
        lines = inner[:end]
    block = "\n".join(lines)
    option = f"--{'.'.join(keys)}"
    unknown = re.search(r"Option '([^']+)' is not accepted", block)
    if unknown:
        return f"{option}.{unknown[1]} is not an option"
    expected = re.findall(r"Expected an? (<class '[\w.]+'>|tuple with \d+ elements|dot import path)", block)
    given = re.findall(r"(?:Given|Got) value: (.*)", block)
    if not keys or not expected:  # a message of another shape: its first informative line
        first = next((line.strip(" -") for line in lines if line.strip(" -")), message.strip())
        return f"{option}: {first}" if keys else first
    names = {"<class 'NoneType'>": "null", "dot import path": "a class path (module.Class)"}
    wanted = [names.get(k, k.removeprefix("<class '").removesuffix("'>")) for k in expected]
    if any(k not in names for k in expected):  # a value was wanted: "or a class path" only confuses
        wanted = [w for w in wanted if w != names["dot import path"]]
    value = f" {given[-1].strip()}" if given else ""
    return f"{option}{value}: expected {' or '.join(dict.fromkeys(wanted))}"


class CaltechArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one ``caltech: error:`` line, not the 80 lines of
    usage before them (``--help`` shows those)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        line = one_line(message)
        if "Fix:" not in line:
            prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
            line += f". Fix: `{prog} --help` lists the options and their types."
        print(f"caltech: error: {line}", file=sys.stderr)
        raise SystemExit(2)
