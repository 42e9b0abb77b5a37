"""Helpers shared by the configs: parse "variant=XL/2,res=256"-style config strings."""

from __future__ import annotations

from dit_jax.models.dit import decode_variant

__all__ = ["decode_variant", "parse_arg"]


def parse_arg(arg: str | None, **defaults: object) -> dict[str, object]:
    """"variant=XL/2,res=256" -> {"variant": "XL/2", "res": 256}, over `defaults`; unknown keys are an error.

    Values are converted to the type of the default (int, float, bool, str).
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.strip().lower() in ("1", "true", "yes", "y")
        elif defaults[key] is None:
            out[key] = value.strip()
        else:
            out[key] = kind(value.strip())
    return out
