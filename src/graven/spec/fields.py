"""The value types every section of ``graven.yaml`` shares: durations, pauses, names,
environment variables, and the strict base of every spec model.

Pure data: each type carries its validation and its JSON Schema, so a constraint
written here reaches both ``graven check`` and editors.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from graven.model import is_valid_name

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h)?$"
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)


def parse_duration(value: Any) -> float:
    """Seconds from ``2``, ``2.5``, ``"500ms"``, ``"2s"``, ``"1m"``."""
    # pydantic reports ValueError as a validation error (TypeError would escape it),
    # and YAML's true/false are not durations.
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 2s or 500ms, got {_shown(value)}")
    # YAML spells infinity '.inf'; a timeout that never fires is a hang, not a setting.
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration such as 2s or 500ms, got {_shown(value)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {_shown(value)}")
    return seconds


def _shown(value: Any) -> str:
    # As YAML spells it: true, not True.
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# Upper bounds of durations, in seconds. Nothing in a rollout waits longer than a day
# (a canary that must hold longer pauses for 'manual'); a probe, a drain or a grace
# period of more than an hour is a typo, and unbounded values overflow the clocks.
MINUTE = 60.0
HOUR = 3600.0
DAY = 24 * HOUR


def _duration_schema(most: float) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": most, "description": "Seconds."},
            {
                "type": "string",
                "pattern": DURATION_PATTERN,
                "description": "A number with an optional unit: ms, s, m or h"
                f" (at most {duration_text(most)}).",
            },
        ]
    }


def duration_text(seconds: float) -> str:
    """``3600`` -> ``1h``, ``90`` -> ``90s``: a bound as a user would write it."""
    for unit, size in (("h", HOUR), ("m", MINUTE)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# A duration of at most a day.
Duration = Annotated[
    float, BeforeValidator(parse_duration), Field(le=DAY), WithJsonSchema(_duration_schema(DAY))
]
# A duration of at most an hour: probes, drains, grace periods.
ShortDuration = Annotated[
    float, BeforeValidator(parse_duration), Field(le=HOUR), WithJsonSchema(_duration_schema(HOUR))
]
MANUAL: Literal["manual"] = "manual"


def parse_pause(value: Any) -> float | str:
    """A canary step's pause: 'manual', or a duration of at most a day."""
    if value == MANUAL:
        return MANUAL
    seconds = parse_duration(value)
    if seconds > DAY:
        raise ValueError(
            f"expected a duration of at most {duration_text(DAY)}, or 'manual' to wait for"
            f" 'graven promote', got {value!r}"
        )
    return seconds


Pause = Annotated[
    float | Literal["manual"],
    BeforeValidator(parse_pause),
    WithJsonSchema({"anyOf": [_duration_schema(DAY), {"const": MANUAL}]}),
]


def _check_name(name: str) -> str:
    if not is_valid_name(name):
        raise ValueError(
            "expected a name of lowercase letters, digits and '-' starting with a letter"
            f" (at most 63 characters), got {name!r}"
        )
    return name


# Image, service and target names end up in instance ids and DNS labels.
Name = Annotated[
    str, AfterValidator(_check_name), WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})
]


def check_env_name(name: str) -> str:
    if not _ENV_NAME_RE.fullmatch(name):
        raise ValueError(
            "expected an environment variable name of letters, digits and '_'"
            f" not starting with a digit, got {name!r}"
        )
    return name


def env_values(v: Any) -> Any:
    # Programs read the environment as text; accept the numbers and booleans YAML
    # produces for unquoted values rather than make users quote every one.
    if isinstance(v, dict):
        out: dict[Any, Any] = {}
        for k, val in v.items():
            if isinstance(val, bool):
                out[k] = "true" if val else "false"
            elif isinstance(val, int | float):
                out[k] = str(val)
            else:
                out[k] = val
        return out
    return v


def check_env_value(value: str) -> str:
    # The kernel passes the environment as NUL-terminated strings: the value would be cut.
    if "\x00" in value:
        raise ValueError(
            "an environment value cannot contain a NUL character"
            f" (at character {value.index(chr(0)) + 1} of {value!r})"
        )
    return value


EnvName = Annotated[
    str,
    AfterValidator(check_env_name),
    WithJsonSchema({"type": "string", "pattern": ENV_NAME_PATTERN}),
]
EnvValue = Annotated[str, AfterValidator(check_env_value)]
EnvMap = Annotated[
    dict[EnvName, EnvValue],
    BeforeValidator(env_values),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": ENV_NAME_PATTERN},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        }
    ),
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|[kmgt])?\s*$")
_SIZE_UNITS = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
SIZE_PATTERN = r"^\d+(\.\d+)?([KMGT]i?B?|[kmgt])?$"


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"256Mi"`` (or ``256MiB``: powers of 1024), ``"1G"``
    (powers of 1000, as Kubernetes reads them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "").removesuffix("B")
        if unit.endswith("i"):
            scale = 1024 ** ("KMGT".index(unit[0]) + 1)
        elif unit:
            scale = _SIZE_UNITS[unit.lower()]
        else:
            scale = 1
        size = int(float(m.group(1)) * scale)
    else:
        raise ValueError(
            f"expected a size such as 256Mi, 1Gi or a number of bytes, got {_shown(value)}"
        )
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {_shown(value)}")
    return size


MAX_SIZE = 2**50  # a pebibyte: past any machine's memory or disk
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    Field(le=MAX_SIZE),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_SIZE, "description": "Bytes."},
                {
                    "type": "string",
                    "pattern": SIZE_PATTERN,
                    "description": "A number with a unit: Ki, Mi, Gi, Ti (powers of 1024)"
                    " or k, M, G, T (powers of 1000).",
                },
            ]
        }
    ),
]
