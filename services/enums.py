"""The API's enums as the words the CLI, the engine and results.json use.

    enum_value(factor_service_pb2.Strategy, "kfac", "strategy")  -> STRATEGY_KFAC
    enum_word(factor_service_pb2.Strategy, STRATEGY_KFAC)         -> "kfac"
Unspecified (0) is the word "" both ways; the field's default is the caller's to apply.
"""

from __future__ import annotations

import re

from .errors import InputError


def _descriptor(enum):
    """An enum's EnumDescriptor, given the generated wrapper or the descriptor itself."""
    return getattr(enum, "DESCRIPTOR", enum)


def _prefix(enum) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", _descriptor(enum).name).upper() + "_"


def words(enum) -> list[str]:
    """Every specified value's word, in number order."""
    prefix = _prefix(enum)
    return [value.name.removeprefix(prefix).lower() for value in _descriptor(enum).values if value.number != 0]


def enum_value(enum, word: str, field: str) -> int:
    """The number of `word` ("" = unspecified); InputError naming `field` if there is none."""
    if not word:
        return 0
    name = _prefix(enum) + word.upper()
    if name not in _descriptor(enum).values_by_name or _descriptor(enum).values_by_name[name].number == 0:
        raise InputError(f"{field} must be one of {', '.join(words(enum))}, got {word!r}", field=field)
    return _descriptor(enum).values_by_name[name].number


def enum_word(enum, number: int, field: str = "") -> str:
    """The word of `number` ("" for unspecified); InputError naming `field` for a number this
    server does not know (a newer client's)."""
    if number == 0:
        return ""
    value = _descriptor(enum).values_by_number.get(number)
    if value is None:
        raise InputError(
            f"{field or _descriptor(enum).name} has no value {number} (one of {', '.join(words(enum))})", field=field
        )
    return value.name.removeprefix(_prefix(enum)).lower()
