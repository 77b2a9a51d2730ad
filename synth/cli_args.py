"""The command line before Hydra reads it: free-text values as typed, prompts files, one-line grammar errors.

Hydra's override grammar reads `prompt=masterpiece, best quality` as a broken list, `prompt=一只猫` as an
error and, under -m, `prompt=a cat, on a mat` as a sweep of two prompts. Prompts are text, so for the
free-text keys of an entry point (infer.py: prompt, negative_prompt; train.py: callbacks.validation.prompts)
the rest of the argument after the first `=` is the value, exactly as typed. The rule, in order:

1. `key=@FILE`: the non-blank lines of FILE (UTF-8), one prompt each (argparse's and curl's `@file`
   convention). For a one-prompt key, several lines are a sweep (one job per line, needs -m); for a list key
   (validation prompts) they are the list.
2. A value that is one whole Hydra-quoted string (`prompt='"a, b"'` in the shell) is Hydra's, as before.
3. A value of the form `choice(...)` (or another Hydra sweep function: sort, shuffle, tag, range, interval,
   glob) is Hydra's sweep, as is a `[...]` list that Hydra reads for a list key.
4. Anything else is the text itself: commas, spaces, quotes, `=`, `:`, brackets, `(word:1.2)`, `${...}`
   (kept literal, never resolved), any script.

Each value is handed to Hydra quoted so that Hydra and OmegaConf read back exactly the typed text.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, Quote, QuotedString
from hydra.errors import HydraException
from omegaconf import OmegaConf

SWEEP_FUNCTIONS = ("choice", "sort", "shuffle", "tag", "range", "interval", "glob", "extend_list")

_parser = None


def parser() -> OverridesParser:
    global _parser
    if _parser is None:
        _parser = OverridesParser.create()
    return _parser


def escape_interpolations(text: str) -> str:
    r"""OmegaConf reads `${...}` as an interpolation and `\${` as a literal `${`; n backslashes before `${`
    stand for n // 2 backslashes. Escaping doubles them and adds one, so any text reads back as itself."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def escape_all_interpolations(value):
    """escape_interpolations on every string inside nested dicts and lists."""
    if isinstance(value, str):
        return escape_interpolations(value)
    if isinstance(value, dict):
        return {key: escape_all_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [escape_all_interpolations(item) for item in value]
    return value


def typed_text(value: str) -> str:
    """The inverse of escape_interpolations: the text a user typed, from the escaped value Hydra stores."""
    return re.sub(r"(\\*)\\\$\{", lambda m: m.group(1)[: len(m.group(1)) // 2] + "${", value)


def hydra_quoted(text: str) -> str:
    """`text` as a single-quoted value of Hydra's override grammar that reads back as exactly `text` (after
    OmegaConf's interpolation escapes). Hydra only treats backslashes before a quote (or the closing
    quote) as escapes: those are doubled, and each inner quote gets one more."""
    return QuotedString(text=escape_interpolations(text), quote=Quote.single).with_quotes()


def read_prompts_file(key: str, path: str) -> list[str]:
    """The non-blank lines of a prompts file, each one prompt as written (the line ending removed)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{key}=@{path}: no such prompts file (a text that starts with @ is written {key}=\"'@...'\")"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a BOM from Windows editors is not part of line 1
    except UnicodeDecodeError as error:
        raise ValueError(f"{key}=@{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}=@{path}: the file holds no prompts (one prompt per line)")
    return prompts


def _is_hydra_quoted(value: str) -> bool:
    """Is value one whole quoted string of Hydra's grammar (the user quoted it Hydra's way)?"""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        return isinstance(parser().parse_override("k=" + value)._value, QuotedString)
    except HydraException:
        return False


def _is_sweep_function(value: str) -> bool:
    return re.fullmatch(rf"\s*(?:{'|'.join(SWEEP_FUNCTIONS)})\s*\(.*\)\s*", value, re.DOTALL) is not None


def _is_hydra_list(value: str) -> bool:
    if not value.lstrip().startswith("["):
        return False
    try:
        return isinstance(parser().parse_override("k=" + value)._value, list)
    except HydraException:
        return False


def free_text_argument(arg: str, text_keys, list_keys, multirun: bool) -> str:
    """One command-line argument with a free-text value rewritten into Hydra's quoted form (see the module
    docstring for the rule); any other argument is returned unchanged."""
    key_part, equals, value = arg.partition("=")
    key = key_part.lstrip("+")
    if not equals or key_part[: len(key_part) - len(key)] not in ("", "+", "++") or key not in (*text_keys, *list_keys):
        return arg
    if value.startswith("@"):
        prompts = read_prompts_file(key, value[1:])
        if key in list_keys:
            return f"{key_part}=[{','.join(hydra_quoted(p) for p in prompts)}]"
        if len(prompts) == 1:
            return f"{key_part}={hydra_quoted(prompts[0])}"
        if not multirun:
            raise ValueError(
                f"{key}={value}: the file holds {len(prompts)} prompts, one job each; add -m to run them as a sweep"
            )
        return f"{key_part}=choice({','.join(hydra_quoted(p) for p in prompts)})"
    if _is_hydra_quoted(value) or _is_sweep_function(value) or (key in list_keys and _is_hydra_list(value)):
        return arg  # Hydra's own syntax, read by Hydra as before (sweep functions: errors are Hydra's)
    if key in list_keys:
        return f"{key_part}=[{hydra_quoted(value)}]"  # one prompt: a list of one
    return f"{key_part}={hydra_quoted(value)}"


def prepare_argv(argv: list[str], text_keys=(), list_keys=()) -> list[str]:
    """The command line with free-text values quoted for Hydra; ValueError/FileNotFoundError for a bad
    prompts file. Flags (and the values of flags that take one) pass through unchanged."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    out = list(argv)
    for index in override_positions(argv):
        out[index] = free_text_argument(argv[index], text_keys, list_keys, multirun)
    return out


def override_positions(argv: list[str]) -> list[int]:
    """Where the overrides are in argv: not Hydra's flags (-m, --cfg job, --info searchpath, -cn name, ...)."""
    from hydra._internal.utils import get_args_parser

    takes_value = {}  # option -> the values it takes (None: any one value)
    for action in get_args_parser()._actions:
        if action.nargs in (None, "?"):
            takes_value.update({option: action.choices if action.nargs == "?" else None for option in action.option_strings})
    positions, index = [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("-"):
            if arg in takes_value and index + 1 < len(argv):
                choices = takes_value[arg]
                index += 1 if choices is None or argv[index + 1] in choices else 0
        else:
            positions.append(index)
        index += 1
    return positions


def check_syntax(argv: list[str], script: str) -> None:
    """Raise ValueError naming the first override Hydra's grammar cannot read, and how to write it."""
    for arg in (argv[index] for index in override_positions(argv)):
        try:
            parser().parse_override(arg)
        except HydraException:
            key, equals, _ = arg.partition("=")
            if not equals:
                raise ValueError(
                    f"{arg!r} is not an override: write key=value, with shell quotes around a value that has spaces "
                    f"(prompt=\"a cat\"); python {script} --help lists the keys"
                ) from None
            if _is_sweep_function(arg.partition("=")[2]):
                raise ValueError(
                    f"cannot read {arg!r}: in a sweep function quote each item, as in {key}=choice(\"a, b\",\"c\")"
                ) from None
            raise ValueError(
                f"cannot read {arg!r}: a value with spaces, commas, brackets, parentheses, quotes or non-ASCII "
                f"text must be quoted, as in {key}=\"'...'\" (python {script} --help lists the keys)"
            ) from None


def nearest_key(key: str, keys: list[str]) -> str | None:
    """The known config key closest to a mistyped one (difflib, as argparse suggests choices)."""
    matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return matches[0] if matches else None


def config_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (mappings only: list items are not keys one mistypes)."""
    from omegaconf import DictConfig

    keys = []
    for name in node.keys():
        path = f"{prefix}{name}"
        keys.append(path)
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys.extend(config_keys(child, path + "."))
    return keys


def _with_quoted_items(override: Override) -> Override:
    if not isinstance(override._value, ChoiceSweep):
        return override
    items = []
    for item in override._value.list:
        if isinstance(item, str) and not _reads_back_bare(item):
            item = QuotedString(text=item, quote=Quote.single)
        items.append(item)
    return dataclasses.replace(override, _value=dataclasses.replace(override._value, list=items))


def _reads_back_bare(item: str) -> bool:
    try:
        return parser().parse_override("k=" + Override._get_value_element_as_str(item)).value() == item
    except HydraException:
        return False


def quote_sweep_jobs() -> None:
    """Let every job of a choice() sweep read its own value back.

    A gap in Hydra 1.3: BasicSweeper writes each job's override with escape_special_characters, which
    leaves quotes and non-ASCII text bare, so `-m 'prompt=choice("一只猫","it\\'s")'` fails in the job
    (`prompt=一只猫` is not in the grammar). Items the bare form would not read back are handed on quoted.
    A sweeper plugin would have to live in the hydra_plugins package, so this wraps the one function.
    """
    from hydra.core.plugins import Plugins

    # Hydra's plugin scan loads the module afresh: patch the class Hydra instantiates, from its registry.
    sweeper = Plugins.instance().class_name_to_class["hydra._internal.core_plugins.basic_sweeper.BasicSweeper"]
    split = sweeper.split_arguments
    if getattr(split, "synth_quotes_items", False):
        return

    def split_arguments(overrides, max_batch_size):
        return split([_with_quoted_items(o) for o in overrides], max_batch_size)

    split_arguments.synth_quotes_items = True
    sweeper.split_arguments = staticmethod(split_arguments)


def config_groups_help(*, _root_) -> str:
    """--help's group list: the groups in this entry point's defaults list (hydra.runtime.choices), not every
    folder of the shared conf/ (Hydra's $APP_CONFIG_GROUPS lists train.py's groups in infer.py's help)."""
    from synth.config import group_options

    lines = []
    for group in _root_.hydra.runtime.choices:
        if group.startswith("hydra/") or group == "local":  # Hydra's own groups; machine-local settings
            continue
        options = group_options(group)
        lines.append(f"{group}: {', '.join(options) if options else '(none yet: see conf/' + group + '/README.md)'}")
    return "\n".join(sorted(lines))


if not OmegaConf.has_resolver("synth_config_groups"):
    OmegaConf.register_new_resolver("synth_config_groups", config_groups_help)
