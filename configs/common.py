"""Helpers shared by the configs: parse "variant=XL/2,res=256"-style config arguments, strictly."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from dit_jax.models.dit import decode_variant
from dit_jax.train.config_load import parse_value
from dit_jax.train.config_schema import ConfigError

__all__ = ["ConfigError", "check_arg", "check_choice", "check_res", "decode_variant", "parse_arg", "variant_arg"]


def parse_arg(arg: str | None, **defaults: object) -> dict[str, object]:
    """"variant=XL/2,res=256" -> {"variant": "XL/2", "res": 256}, over `defaults`.

    Each value is parsed to the type of its default (bool, int, float, str; None = str) by the parser of the
    command-line overrides (dit_jax.train.config_load.parse_value): "runlocal=ture" or "res=abc" is an error, as
    are unknown keys, a key given twice and an item without "=". Errors are ConfigError (a ValueError).
    """
    out = dict(defaults)
    if not arg:
        return out
    seen: set[str] = set()
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            example = ",".join(f"{k}={v}" for k, v in list(defaults.items())[:2])
            raise ConfigError(f"config argument {item!r} is not of the form key=value (comma-separated, e.g. "
                              f"{example}); known keys: {', '.join(sorted(defaults))}")
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        if key in seen:
            raise ConfigError(f"config argument {key!r} is given twice")
        seen.add(key)
        kind = str if defaults[key] is None else type(defaults[key])
        out[key] = parse_value(key, value.strip(), kind, what="config argument")
    return out


def check_arg(key: str, value: Any, ok: bool, expected: str) -> None:
    """Raise ConfigError "config argument KEY=VALUE EXPECTED" unless ok."""
    if not ok:
        raise ConfigError(f"config argument {key}={value!r} {expected}")


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ConfigError unless value is one of `allowed`."""
    check_arg(key, value, value in allowed, f"is not one of {tuple(allowed)}")


def variant_arg(variant: str, decode: Callable[[str], dict[str, int]] = decode_variant) -> dict[str, int]:
    """decode(variant) (the variant's depth, width, heads, patch size), its error naming the config argument."""
    try:
        return decode(variant)
    except ValueError as e:
        raise ConfigError(f"config argument variant={variant!r}: {e}") from None


def check_res(res: int, patch_size: int) -> None:
    """A pixel resolution the SD VAE (8x downsampling) and the model's patches divide."""
    multiple = 8 * patch_size
    check_arg("res", res, res > 0 and res % multiple == 0,
              f"must be a positive multiple of {multiple} (the VAE downsamples by 8, then the model cuts "
              f"{patch_size}x{patch_size} patches), e.g. 256 or 512")
