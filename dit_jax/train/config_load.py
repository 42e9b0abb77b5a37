"""Loading a trainer config file, locking it, `--config.KEY=VALUE` overrides, and the config a checkpoint saved.

A config is a Python file with `get_config(arg: str | None = None) -> ConfigDict` (big_vision style; its
docstring is the launch command), starting from the schema `dit_jax.train.config_schema.base_config()`.
`load_config("configs/dit_imagenet.py:variant=XL/2,res=256", overrides)` imports the file, calls
`get_config("variant=XL/2,res=256")`, locks the result (a mistyped key is an error that names it and suggests
close matches), applies command-line overrides such as `--config.optim.lr=3e-4`, each parsed to the type of the
field it replaces, and validates it (config_schema.validate_config). This is the behaviour of
`ml_collections.config_flags.DEFINE_config_file(..., lock_config=True)`, as a plain function, so the CLI, the
Colab notebook and the tests share it and its error messages say what to type instead.

Checkpoints store the config as JSON (`config_to_dict`); `config_from_dict(d, fill_defaults=True)` reads it back
over the schema, so a run saved before a field existed gets the field's default.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from ml_collections import ConfigDict

from dit_jax.train.config_schema import ConfigError, apply_runlocal, base_config, flat_keys, validate_config

__all__ = [
    "ConfigError",  # (defined with the schema; loading raises it too)
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_config_spec",
    "parse_value",
    "split_config_argv",
]

# The repository checkout (…/dit_jax/train/config_load.py -> …): relative config paths resolve against it too.
REPO_ROOT = Path(__file__).resolve().parents[2]

_TRUE = ("true", "t", "yes", "y", "on", "1")
_FALSE = ("false", "f", "no", "n", "off", "0")


# ==========================================================================================================
# Loading
# ==========================================================================================================
def parse_config_spec(spec: str) -> tuple[str, str | None]:
    """"configs/x.py:variant=XL/2" -> ("configs/x.py", "variant=XL/2"); "configs/x.py" -> ("configs/x.py", None)."""
    match = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec.strip())
    if not match:
        raise ConfigError(f"config spec {spec!r} is not of the form path/to/config.py[:arg]: a config is a Python file "
                          f"with get_config(), e.g. configs/digits.py or configs/dit_imagenet.py:variant=B/4")
    return match.group(1), match.group(2)


def _search_roots() -> list[Path]:
    """Where a relative config path is looked for: the working directory, the checkout, an installed `configs`."""
    roots = [Path.cwd(), REPO_ROOT]
    try:  # an installed `configs` package (setup.py ships configs/*.py)
        spec = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(loc).parent for loc in spec.submodule_search_locations]
    return roots


def _candidates(path: str) -> list[Path]:
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return [candidate]
    tried: list[Path] = []
    for root in _search_roots():
        if root / candidate not in tried:
            tried.append(root / candidate)
    return tried


def _config_files_in(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("*.py") if p.stem not in ("__init__", "common", "sweeps"))
    return ", ".join(str(Path(folder.name) / n) for n in names[:6]) or "none"


def _spec_error(spec: str, error: ConfigError) -> ConfigError:
    """A spec that names no .py file: say so more precisely when it is a folder."""
    for p in _candidates(spec.split(":", 1)[0]):
        if p.is_dir():
            return ConfigError(f"config {spec!r} is a folder; name a config file in it ({_config_files_in(p)})")
    return error


def _resolve_config_path(path: str) -> Path:
    tried = _candidates(path)
    for p in tried:
        if p.is_file():
            return p.resolve()
    for p in tried:
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder, not a Python file with get_config()")
    raise ConfigError(f"config file {path!r} not found; tried: {', '.join(str(p) for p in tried)}")


def _import_config_module(path: Path):
    # The config files import `configs.common`: make the checkout that holds this file importable.
    if path.parent.name == "configs" and (path.parent / "__init__.py").is_file():
        root = str(path.parent.parent)
        if importlib.util.find_spec("configs") is None and root not in sys.path:
            sys.path.insert(0, root)
    name = "_dit_jax_config_" + re.sub(r"\W", "_", path.stem) + "_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} is not valid Python ({e.msg}, line {e.lineno}); a config file "
                          f"defines get_config(arg=None) returning an ml_collections.ConfigDict") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a text (Python) file: {e.reason}") from e
    except ImportError as e:
        raise ConfigError(f"config file {path} cannot be imported: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} has no get_config(arg=None) function")
    return module


def _call_get_config(module: Any, path: str, arg: str | None) -> ConfigDict:
    """module.get_config(arg) (no argument when `arg` is None); its ValueErrors become ConfigErrors naming the spec."""
    spec = path if arg is None else f"{path}:{arg}"
    if arg is not None:
        try:
            inspect.signature(module.get_config).bind(arg)
        except TypeError:
            raise ConfigError(f"config {path} takes no argument (its get_config() has no parameter): "
                              f"drop ':{arg}'") from None
        except ValueError:  # no signature (a builtin): just call it
            pass
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError as e:  # ConfigError included: a bad config argument
        raise ConfigError(f"config {spec}: {e}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, expected an ml_collections.ConfigDict")
    return config


def _leaf_values(config: ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of every leaf field."""
    out = {}
    for key in flat_keys(config):
        node = config
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def load_config(spec: str, overrides: Sequence[str] = (), *, validate: bool = True) -> ConfigDict:
    """Load "path/to/config.py[:arg]", lock it, apply `overrides`, re-apply runlocal, validate.

    spec: a path relative to the working directory or to the repository root (so "configs/digits.py" works from
    anywhere), with an optional ":arg" passed to `get_config(arg)` (no ":" calls `get_config()`).
    overrides: "--config.optim.lr=3e-4", "config.optim.lr=3e-4" or "optim.lr=3e-4"; a bool field alone
    ("--config.runlocal") means True. Each value is parsed to the type of the field it replaces; unknown keys
    and unparsable values raise ConfigError naming the key. A key the overrides change that does not apply to
    the config (flow.* when objective=diffusion, ...) is an error too (config_schema.validate_config).
    """
    try:
        path, arg = parse_config_spec(spec)
    except ConfigError as e:
        raise _spec_error(spec, e) from None
    module = _import_config_module(_resolve_config_path(path))
    config = _call_get_config(module, path, arg)
    config.lock()
    before = _leaf_values(config)
    apply_overrides(config, overrides)
    if config.runlocal:
        # runlocal requested on the command line shrinks after the overrides; explicit overrides still win.
        apply_runlocal(config)
        apply_overrides(config, [o for o in overrides if _override_key(o) != "runlocal"])
    if validate:
        after = _leaf_values(config)
        changed = {k for k in map(_override_key, overrides) if k in before and after[k] != before[k]}
        validate_config(config, changed=changed)
    return config


def split_config_argv(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Command-line words -> (config spec, config overrides, everything else).

    Understands "--config SPEC", "--config=SPEC", "--config.key=value" and "--config.key value" (the value
    word must not start with "--"; a bool key alone means True), leaving other words alone.
    """
    spec, overrides, rest = None, [], []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--config":
            if i + 1 >= len(words):
                raise ConfigError("--config needs a value: path/to/config.py[:arg]")
            spec, i = words[i + 1], i + 2
            continue
        if word.startswith("--config="):
            spec = word.split("=", 1)[1]
        elif word.startswith("--config."):
            if "=" not in word and i + 1 < len(words) and not words[i + 1].startswith("--"):
                word, i = f"{word}={words[i + 1]}", i + 1
            overrides.append(word)
        else:
            rest.append(word)
        i += 1
    return spec, overrides, rest


# ==========================================================================================================
# Overrides
# ==========================================================================================================
def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].strip()
    for prefix in ("--config.", "-config.", "config."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _unknown_key(config: ConfigDict, key: str) -> ConfigError:
    keys = flat_keys(config)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
    if not close:  # a mistyped section ("optimm.lr"): compare the last parts
        leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
        near = set(difflib.get_close_matches(key.rsplit(".", 1)[-1], set(leaves.values()), n=3, cutoff=0.75))
        close = [k for k, leaf in leaves.items() if leaf in near][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (the config is locked: overrides cannot add fields)")


def _type_name(kind: type) -> str:
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(kind, kind.__name__)


def parse_value(key: str, raw: str | None, kind: type, *, what: str = "config key") -> Any:
    """Text typed by a user -> a value of `kind` (bool, int, float, str, tuple, list), strictly.

    The one parser of config overrides (`--config.KEY=VALUE`) and config arguments (configs/common.parse_arg):
    bools are true/false (also yes/no, on/off, 1/0, t/f, y/n; any case) and nothing else; ints are whole numbers
    ("400000", "4e5", "1_024"); floats are finite numbers; strings are taken as typed (one pair of surrounding
    quotes is removed). raw None (a flag with no "=VALUE") means True for a bool. Anything else raises ConfigError
    naming `what` and `key`, the expected type and the text.
    """
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{what} {key!r} expects {_type_name(kind)}, got {raw!r}{extra}")

    if raw is None:  # "--config.flag" with no value
        if kind is bool:
            return True
        raise ConfigError(f"{what} {key!r} needs a value: --config.{key}=VALUE" if what == "config key"
                          else f"{what} {key!r} needs a value: {key}=VALUE")
    text = raw.strip()
    if kind is type(None):  # an untyped None field: the Python literal, or the text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if text == "None":
        raise bad(" (None is not allowed for a typed field; string fields use '' for 'unset')")
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad()
    if kind is int:
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise bad() from None
            if math.isfinite(number) and number.is_integer():
                return int(number)  # "4e5"
            raise bad() from None
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            raise bad() from None
        if not math.isfinite(number):
            raise bad(" (a finite number)")
        return number
    if kind is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return raw
    if kind in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise bad() from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return kind(value)
    raise ConfigError(f"{what} {key!r} has type {kind.__name__}, which cannot be set from text")


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Apply "--config.a.b=value" / "a.b=value" overrides in place (see load_config); returns config."""
    for override in overrides:
        key = _override_key(override)
        raw = override.split("=", 1)[1] if "=" in override else None
        if not key:
            raise ConfigError(f"override {override!r} names no key")
        *sections, name = key.split(".")
        node = config
        for part in sections:
            if part not in node or not isinstance(node[part], ConfigDict):
                raise _unknown_key(config, key)
            node = node[part]
        if name not in node:
            raise _unknown_key(config, key)
        if isinstance(node[name], ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; override its fields ({key}.FIELD=VALUE)")
        value = parse_value(key, raw, node.get_type(name))
        try:
            node[name] = value
        except TypeError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return config


# ==========================================================================================================
# Serialisation (checkpoints store the config as JSON)
# ==========================================================================================================
def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / jax scalars
        return value.item()
    raise ConfigError(f"config value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def config_to_dict(config: ConfigDict) -> dict:
    """A nested dict of JSON types (tuples become lists); json.dumps(config_to_dict(c)) always works."""
    return _plain(config.to_dict())


def config_from_dict(d: dict, *, fill_defaults: bool = False) -> ConfigDict:
    """The inverse of config_to_dict: a locked ConfigDict. fill_defaults=True merges `d` over base_config(), so a
    config saved before a field existed gets the field's default (keys unknown to the schema are kept)."""
    if fill_defaults:
        config = base_config()

        def merge(node: ConfigDict, values: dict) -> None:
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(node.get(k), ConfigDict):
                    merge(node[k], v)
                elif k in node and not isinstance(node[k], ConfigDict):
                    node[k] = v
                else:
                    node[k] = ConfigDict(v) if isinstance(v, dict) else v

        merge(config, d)
    else:
        config = ConfigDict(d)
    config.lock()
    return config
