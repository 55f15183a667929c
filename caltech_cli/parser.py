"""The command line's parser: LightningCLI's, with jsonargparse's errors as one line each, and the
limits of what a config or an option may hold."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import get_loader, set_loader
from pytorch_lightning.cli import LightningArgumentParser

from caltech_cli.errors import CaltechError
from caltech_cli.files import kind_of
from caltech_cli.text import shown


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def one_line(message: str) -> str:
    """jsonargparse's error (often a dozen lines about Union subtypes) as one line: the option,
    the value given and what it must be."""
    if "compute_fn" in message and " failed: " in message:  # our own message, raised in a link
        return message.split(" failed: ", 1)[1].strip()
    denied = re.search(r"Importing '([\w.]+)' is not allowed", message)
    if denied:  # the import path policy (cli.TRUSTED_IMPORTS), wherever in a union it was met
        option = re.match(r'\s*Parser key "([^"]+)"', message)
        return (
            f"{'--' + option[1] + ': ' if option else ''}{denied[1]} is not in a package caltech lets a config "
            "import. Fix: name a class or function of torch, Lightning, torchmetrics, timm or caltech_cli, or "
            "add its package to CALTECH_TRUSTED_IMPORTS (comma-separated) if you trust it."
        )
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

    # The checkpoint whose saved options are being parsed (LightningCLI parses them after the
    # command line): an error then is the checkpoint's, not an option the user gave.
    checkpoint_read: str | None = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        line = one_line(message)
        if self.checkpoint_read is not None:
            raise CaltechError(
                f"the checkpoint {self.checkpoint_read} saved a model option that cannot be used "
                f"({line.removeprefix('--').split('. Fix:')[0]}): it was altered, or not written by `caltech fit`. "
                "Fix: pass a checkpoint that `caltech fit` wrote."
            )
        if "Fix:" not in line:
            prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
            line += f". Fix: `{prog} --help` lists the options and their types."
        print(f"caltech: error: {shown(line)}", file=sys.stderr)
        raise SystemExit(2)


# What a config file or an option value may hold: a megabyte, and no more values than this once its
# YAML aliases are expanded (a "billion laughs" of 446 bytes expands to 10**9 and takes a minute and
# gigabytes before anything can say so).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values a YAML node stands for once its aliases are expanded (counting stops past
    ``limit``), without recursion: an alias is its anchored node again."""
    sizes: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        current, done = stack.pop()
        if id(current) in sizes:
            continue
        children = current.value if isinstance(current, yaml.CollectionNode) else []
        children = [part for pair in children for part in pair] if isinstance(current, yaml.MappingNode) else children
        if done:
            sizes[id(current)] = min(limit + 1, 1 + sum(sizes[id(child)] for child in children))
        else:
            stack.append((current, True))
            stack += [(child, False) for child in children if id(child) not in sizes]
    return sizes[id(node)]


def check_config_text(text: str, where: str) -> None:
    """Refuse a config or an option value larger than the limits, before anything parses it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise CaltechError(
            f"{where} holds {len(text):,} characters, over the limit of {MAX_CONFIG_BYTES:,}. Fix: shorten it."
        )
    if not any(mark in text for mark in "&*[{:-"):  # a plain scalar: nothing nests or expands
        return
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return  # not YAML: the parser's own error says what it expected
    except RecursionError:
        raise CaltechError(f"{where} nests its values too deep to read. Fix: flatten it.") from None
    if sum(_expanded_size(node, MAX_CONFIG_VALUES) for node in nodes if node is not None) > MAX_CONFIG_VALUES:
        raise CaltechError(
            f"{where} expands to more than {MAX_CONFIG_VALUES:,} values through its YAML aliases (*name). "
            "Fix: write the values out, without nested aliases."
        )


def _special_file(value: str) -> str | None:
    """What ``value`` names when it is a FIFO, a device or a socket (reading one blocks or never
    ends), else None."""
    if not value or len(value) > 4096 or "\n" in value or "\0" in value:
        return None
    try:
        kind = kind_of(Path(value), follow=True)
    except (OSError, ValueError):
        return None
    return kind if kind in ("FIFO", "device", "socket") else None


def _refuse_special(value: str, where: str) -> None:
    kind = _special_file(value)
    if kind is not None:
        raise CaltechError(
            f"{where}: {value} is a {kind}, not a regular file; reading or writing it could wait for ever. "
            "Fix: pass a regular file."
        )


def _strings_in(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str):
            yield current
        elif isinstance(current, dict):
            stack += [*current.keys(), *current.values()]
        elif isinstance(current, list):
            stack += current


_yaml_load = get_loader("yaml")


def checked_yaml_load(text: str) -> Any:
    """jsonargparse's YAML loader behind the limits: every config and value it reads comes through
    here, the files that a config names as values included, so none is parsed past the limits,
    and none names a FIFO that the next read would wait on for ever."""
    check_config_text(text, "a config or option value")
    value = _yaml_load(text)
    for string in _strings_in(value):
        _refuse_special(string, "a config")
    return value


def use_checked_loader() -> None:
    """Read every config and option value through :func:`checked_yaml_load`."""
    set_loader("yaml", checked_yaml_load, (yaml.YAMLError,))


def check_arguments(args: list[str]) -> None:
    """Check every argument, and every config file named, against the limits of what a config may
    hold; a file is read only if it is a regular one, and never past the limit. No argument may
    name a FIFO, a device or a socket: reading one waits for ever, or never ends."""
    for previous, arg in zip(["", *args], args):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        _refuse_special(value, (arg.split("=", 1)[0] if "=" in arg else previous) or "an argument")
        path = Path(value)
        named = previous in ("-c", "--config") or value.endswith(CONFIG_SUFFIXES)
        if named and kind_of(path, follow=True) is None and path.is_file():
            with open(path, encoding="utf-8", errors="replace") as file:
                check_config_text(file.read(MAX_CONFIG_BYTES + 1), f"config {path}")
        else:
            check_config_text(value, f"option value {value[:40]!r}")
