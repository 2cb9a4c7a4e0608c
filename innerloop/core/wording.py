"""Small pieces of wording shared by innerloop's messages."""

from __future__ import annotations


def a_type(value: object) -> str:
    """``"an int"``, ``"a list"``: the type of ``value`` with its indefinite article, for a message
    saying what was given (``"an UnknownTokenizer"``, ``"a UserDict"``: by the sound of its first letters)."""
    name = type(value).__name__
    lowered = name.lower()
    vowel_sound = lowered[:1] in ("a", "e", "i", "o") or (
        lowered.startswith("un") and not lowered.startswith("uni")
    )
    return f"{'an' if vowel_sound else 'a'} {name}"


def counted(count: int, noun: str, plural: str | None = None, *, grouped: bool = False) -> str:
    """``"1 window"``, ``"3 windows"``, ``"1 optimizer step"``: ``count`` and ``noun``, in the plural
    (``plural``, by default ``noun`` + ``s``) unless ``count`` is 1, for a message or title that counts
    something; ``grouped``: the count with thousands separators (``"4,096 tokens"``)."""
    number = f"{count:,}" if grouped else str(count)
    return f"{number} {noun if count == 1 else (plural or noun + 's')}"
