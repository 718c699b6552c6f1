"""Range checks for the numeric settings of the config dataclasses: a bad number fails in one line that
names the setting, before any data is built or any step is taken (not as a ZeroDivisionError, an empty
test set, or an untrained model reported as done)."""

from __future__ import annotations

import json


def at_least(section: str, obj, minimum: float, *names: str, optional: bool = False) -> None:
    """Every ``obj.<name>`` is >= ``minimum`` (None allowed when ``optional``)."""
    for name in names:
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < minimum:
            raise ValueError(f"{section}.{name} must be a number >= {minimum:g}, got {value!r}")


def in_open_interval(section: str, obj, name: str, lo: float, hi: float) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo < value < hi:
        raise ValueError(f"{section}.{name} must be in ({lo:g}, {hi:g}), got {value!r}")


def parse_like(value: str, current):
    """A command-line string as the type of the setting's current value (None: a number if it reads as
    one, else the string)."""
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if value.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, list) or value.startswith("["):
        return json.loads(value)
    if current is None:
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def like_default(dotted: str, value, cur, parse=None, annotation: object = ""):
    """``value`` (a JSON/YAML value, or a string that ``parse(value, cur)`` reads) as the type of the
    setting's default ``cur``; a value of another kind fails in one line naming the setting. A field
    annotated ``float`` whose default is written as an int takes floats."""
    if isinstance(cur, int) and not isinstance(cur, bool) and "float" in str(annotation):
        cur = float(cur)
    if isinstance(value, str) and parse is not None:
        try:
            return parse(value, cur)
        except ValueError as exc:
            raise ValueError(f"setting {dotted!r}: {exc}") from None
    if value is None or cur is None:
        return value
    if isinstance(cur, bool):
        ok = isinstance(value, bool)
    elif isinstance(cur, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            (isinstance(cur, float) or float(value).is_integer())
        value = type(cur)(value) if ok else value
    elif isinstance(cur, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(cur))
    if not ok:
        raise ValueError(f"setting {dotted!r} expects {type(cur).__name__} (like {cur!r}), got {value!r}")
    return value


def parse_device(name, what: str = "--device"):
    """``name`` as a torch.device, or one line saying it is not one."""
    import torch

    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} {name!r} is not a device: use cpu, cuda or cuda:N") from None


def check_device(name, what: str = "--device"):
    """``name`` parsed and present on this machine (a GPU that is visible, an index that exists)."""
    import torch

    dev = parse_device(name, what)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{what} {name!r}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} {name!r}: MPS is not available here")
    return dev
