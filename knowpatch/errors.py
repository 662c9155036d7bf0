"""The one exception type knowpatch raises for bad input; its message names the field."""


class KnowpatchError(ValueError):
    """Bad input or state: the message names the field (or file) and the offending value."""


def field_error(field: str, problem: str, value: object = None) -> KnowpatchError:
    shown = "" if value is None else f" (got {_short(value)})"
    return KnowpatchError(f"{field}: {problem}{shown}")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
