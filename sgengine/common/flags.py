"""Typed flags from dataclass type hints: the one parser and validator of every sgengine CLI.

A field's hint says how a string converts and what values are allowed: ``int``, ``float``, ``bool``
(true/false/1/0/yes/no), ``str``, ``X | None`` ('none' is None), ``Literal[...]`` and enums (the
choices), ``tuple[int, ...]`` ('1,2,4'), nested dataclasses (``--model.channels``), and
``Annotated[X, Range(...)]`` for ranges (the aliases ``Count``, ``Positive``, ``Fraction``, ...).
``validate`` checks a built dataclass against the same hints (frozen configs call it from
``__post_init__``), so the Python API and the command line refuse the same values.

Errors are ``ConfigError(key, message)``: ``str()`` reads ``lr must be > 0, got -1.0`` (API
errors never point to flags); the CLI prints ``error: --lr must be > 0, got -1.0`` and exits 2.
Flags are ``--snake_case``, one spelling: a ``--kebab-case`` one is refused with the snake_case name to use.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Literal, Union


@dataclass(frozen=True)
class Range:
    """An interval a numeric field must lie in; any bound may be open, closed or absent. ``finite``
    also refuses +-inf (a learning rate of inf passes ``> 0`` but trains nothing)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = False

    def holds(self, v) -> bool:
        if v != v or (self.finite and v in (float("inf"), float("-inf"))):  # NaN lies in no interval
            return False
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))

    def __str__(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        return (f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None
                else f"<= {self.le}" if self.le is not None else f"< {self.lt}")


Count = Annotated[int, Range(ge=1)]  # steps, batch sizes, clusters
NonNegInt = Annotated[int, Range(ge=0)]  # 0 switches a feature off
Positive = Annotated[float, Range(gt=0, finite=True)]
NonNeg = Annotated[float, Range(ge=0, finite=True)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # probabilities that must leave room, EMA decays
Unit = Annotated[float, Range(ge=0, le=1)]


class ConfigError(ValueError):
    """A value that a field does not allow; ``key`` is its dotted name (``model.channels``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message

    def as_flag(self) -> str:
        return f"--{self.key} {self.message}"


@dataclass(frozen=True)
class Kind:
    """A hint taken apart: the base type, whether None is allowed, the choices and the ranges."""
    base: object
    optional: bool = False
    choices: tuple = ()
    ranges: tuple = ()


def kind_of(hint) -> Kind:
    optional, ranges = False, ()
    if typing.get_origin(hint) is Annotated:
        hint, *extra = typing.get_args(hint)
        ranges = tuple(r for r in extra if isinstance(r, Range))
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, inner = True, kind_of(args[0])
        return Kind(inner.base, optional, inner.choices, inner.ranges + ranges)
    if typing.get_origin(hint) is Literal:
        return Kind(type(typing.get_args(hint)[0]), optional, typing.get_args(hint), ranges)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return Kind(hint, optional, tuple(hint), ranges)
    return Kind(hint, optional, (), ranges)


def hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def _show(choices) -> str:
    return ", ".join(repr(c) if c == "" else str(c.value if isinstance(c, enum.Enum) else c) for c in choices)


def _scalar(text: str, base, key: str):
    try:
        if base is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return base(text) if text in {str(m.value) for m in base} else base[text]
        return base(text)
    except (ValueError, KeyError):
        name = {int: "an integer", float: "a number", bool: "true or false"}.get(base, getattr(base, "__name__", base))
        raise ConfigError(key, f"expects {name}, got {text!r}") from None


def convert(text: str, hint, key: str):
    """A command-line string as the value the hint describes (checked by ``check``)."""
    k = kind_of(hint)
    if k.optional and text.lower() in ("none", "null"):
        return None
    if typing.get_origin(k.base) is tuple:
        args = typing.get_args(k.base)
        items = [t.strip() for t in text.split(",") if t.strip()]
        item_hints = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_hints) != len(items):
            raise ConfigError(key, f"expects {len(item_hints)} comma-separated values, got {text!r}")
        value = tuple(convert(t, h, key) for t, h in zip(items, item_hints))
    else:
        value = _scalar(text, k.base, key)
    return check(value, hint, key)


def check(value, hint, key: str):
    """``value`` if the hint allows it (an int where a float goes becomes a float), else ConfigError."""
    k = kind_of(hint)
    if value is None:
        if k.optional:
            return None
        raise ConfigError(key, "must be set (None is not allowed)")
    if k.choices and value not in k.choices:
        raise ConfigError(key, f"must be one of {_show(k.choices)}, got {value!r}")
    if typing.get_origin(k.base) is tuple:
        args = typing.get_args(k.base)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(key, f"expects comma-separated values, got {value!r}")
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ConfigError(key, f"expects {len(item_hints)} values, got {value!r}")
        return tuple(check(v, h, key) for v, h in zip(value, item_hints))
    if k.base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(k.base, type) and not isinstance(value, k.base) or (k.base is int and isinstance(value, bool)):
        raise ConfigError(key, f"expects {k.base.__name__}, got {type(value).__name__} {value!r}")
    for r in k.ranges:
        if not r.holds(value):
            what = "finite" if r.finite and value in (float("inf"), float("-inf")) else r
            raise ConfigError(key, f"must be {what}, got {value!r}")
    return value


def validate(obj, prefix: str = "") -> None:
    """Check every field of a dataclass instance (nested ones included) against its hint."""
    for name, hint in hints(type(obj)).items():
        check(getattr(obj, name), hint, prefix + name)  # nested configs check their own fields when built


def nested_class(hint):
    """The dataclass a (possibly Optional) hint names, or None."""
    base = kind_of(hint).base
    return base if dataclasses.is_dataclass(base) else None


def from_plain(cls, base, values: dict, prefix: str = ""):
    """Replace fields of ``base`` (an instance of ``cls``, or None: ``cls()``) from JSON-like or
    command-line values: dotted keys or nested dicts, strings converted by the hints, unknown keys
    refused. Returns the new instance; the dataclass's own checks run on it."""
    base = cls() if base is None else base
    known = hints(cls)
    top, nested = {}, {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in known:
            close = difflib.get_close_matches(head, known, 1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(prefix + key, f"is not a setting of {cls.__name__}{hint}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif nested_class(known[head]) and isinstance(value, dict):
            nested.setdefault(head, {}).update(value)
        else:
            top[head] = _typed(value, known[head], prefix + head)
    for head, sub in nested.items():
        sub_cls = nested_class(known[head])
        if sub_cls is None:
            raise ConfigError(prefix + head, "has no sub-settings")
        top[head] = from_plain(sub_cls, top.get(head, getattr(base, head)), sub, f"{prefix}{head}.")
    try:
        return dataclasses.replace(base, **top)
    except ConfigError as err:
        raise ConfigError(prefix + err.key, err.message) from None
    except (ValueError, TypeError) as err:  # a sub-config's own cross-field check, e.g. UViTConfig's
        key = prefix + next(iter(top)) if len(top) == 1 else prefix.rstrip(".") or cls.__name__
        raise ConfigError(key, f"is refused: {err}") from None


def _typed(value, hint, key):
    if isinstance(value, str) and kind_of(hint).base is not str:
        return convert(value, hint, key)
    if nested_class(hint) and value is not None and not dataclasses.is_dataclass(value):
        raise ConfigError(key, f"expects settings of {nested_class(hint).__name__}, got {value!r}")
    return check(value, hint, key)


def field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: its help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))


def metavar(hint) -> str:
    k = kind_of(hint)
    if k.choices:
        text = "{" + ",".join("''" if c == "" else str(c.value if isinstance(c, enum.Enum) else c) for c in k.choices) + "}"
    elif typing.get_origin(k.base) is tuple:
        args = typing.get_args(k.base)
        names = [kind_of(a).base.__name__.upper() for a in args if a is not Ellipsis]
        text = f"{names[0]},..." if args[-1] is Ellipsis else ",".join(names)
    else:
        text = getattr(k.base, "__name__", str(k.base)).upper()
    return text + ("|none" if k.optional else "")


def flat_fields(cls, default, prefix: str = ""):
    """(dotted key, hint, default value, help) of every leaf field, nested dataclasses expanded."""
    docs = field_docs(cls)
    for name, hint in hints(cls).items():
        value = getattr(default, name) if default is not None else None
        sub = nested_class(hint)
        if sub is not None:
            yield from flat_fields(sub, value if value is not None else sub(), f"{prefix}{name}.")
        else:
            yield prefix + name, hint, value, docs.get(name, "")


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def join_negative_values(argv: list[str]) -> list[str]:
    """A negative number after a flag joined to it (``--lr=-1e-3``: argparse reads ``-1e-3`` as a flag)."""
    out = []
    for arg in argv:
        if arg.startswith("-") and _number(arg) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def typed(hint):
    """An argparse ``type=`` from a hint: ``parser.add_argument("--n", type=typed(Count))``; its
    errors read ``error: --n must be >= 1, got 0`` like the dataclass flags'."""
    def parse(text: str):
        try:
            return convert(text, hint, "")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(err.message) from None
    parse.__name__ = metavar(hint)
    return parse


def add_typed(parser, flag: str, hint, **kw):
    """``add_argument`` with the hint's converter and metavar (INT, FLOAT|none, {a,b}, ...)."""
    kw.setdefault("metavar", metavar(hint))
    return parser.add_argument(flag, type=typed(hint), **kw)


class FlagParser(argparse.ArgumentParser):
    """argparse with the engine's conventions: one-line ``error: ...`` and exit 2, one ``--snake_case``
    spelling (a kebab-case one is refused naming the flag to use), a close match suggested for an unknown flag."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(join_negative_values(list(sys.argv[1:] if args is None else args)), namespace)

    def error(self, message: str):
        typed_value = re.match(r"argument (--\w[\w.]*)(?:/\S+)?: (.*)$", message, re.S)
        if typed_value:  # argparse's "argument --n: msg" in the one style: "--n msg"
            message = f"{typed_value.group(1)} {typed_value.group(2)}"
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            message = self._unknown(unknown.group(1))
        self.exit(2, f"error: {message}\n")

    def _unknown(self, token: str) -> str:
        """The error for an unknown flag: the snake_case spelling of a kebab-case one, else a close match."""
        flags = [s for a in self._actions for s in a.option_strings]
        flag = token.split("=")[0]
        snake = "--" + flag[2:].replace("-", "_")
        if flag.startswith("--") and snake != flag and snake in flags:
            return f"unknown flag {flag}: flags are spelled --snake_case, use {snake}; see {self.prog} --help"
        close = difflib.get_close_matches(flag, flags, 1, cutoff=0.75)
        return f"unknown flag {token}" + (f" (did you mean {close[0]}?)" if close else "") + f"; see {self.prog} --help"

    def fail(self, err: ConfigError):
        self.error(err.as_flag())


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, default, skip=(), docs=None) -> None:
    """One ``--key`` per leaf field (values parsed later by ``collect``, so every error names its flag);
    ``docs`` overrides the help taken from the fields' comments."""
    for key, hint, value, doc in flat_fields(cls, default):
        if key in skip:
            continue
        doc = (docs or {}).get(key, doc)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        parser.add_argument(f"--{key}", dest=key, default=None, metavar=metavar(hint),
                            help=f"{doc} (default: {shown})" if doc else f"(default: {shown})")


def collect(namespace: argparse.Namespace, keys) -> dict:
    """The flags the user gave, as {dotted key: string}."""
    args = vars(namespace)
    return {k: args[k] for k in keys if args.get(k) is not None}


def error_line(err: BaseException) -> str:
    """The one line every CLI prints for a refused input: ``error: <message>`` (exit 2). A KeyError's
    message without its repr quotes, an OSError as 'path: reason' (not '[Errno 2] ...' or a bare '2'),
    any line breaks folded, so the output stays one line."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return "error: " + " ".join(text.split())


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program that Ctrl-C stopped


def run_cli(main) -> None:
    """``sys.exit(main())`` for every CLI: Ctrl-C ends in one line and exit 130, not a traceback
    (the trainer's main catches it first: it saves the step and names the resume command)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C before the command finished; run it again", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
