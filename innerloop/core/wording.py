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
