"""Text that came from the sandbox, made safe to show a person on a terminal.

Everything a sandbox sends is hostile when printed: an escape sequence can clear
the screen, forge a green ``OK`` or write the operator's clipboard (OSC 52), and
a bidi override can make text read differently from what it is. :func:`printable`
replaces every such character with a visible escape; callers print the result as
plain text, never as markup.
"""

from __future__ import annotations

import unicodedata

# Control (C0, DEL, C1), format (bidi overrides, zero-width, tags), lone surrogates,
# and the line and paragraph separators some terminals and editors honour.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, *, multiline: bool = False) -> str:
    r"""``text`` with every character that could steer a terminal made visible.

    Args:
        text: Text from the sandbox (or anything derived from it).
        multiline: Keep line feeds and tabs (for tracebacks and stderr tails);
            otherwise they are escaped too, so the text stays on one line.

    Returns:
        The text with unsafe characters replaced by Python-style escapes
        (``\x1b``, ``\u202e``); it holds no control character, no bidi control
        and no lone surrogate, so it always encodes as UTF-8.
    """
    if text.isascii() and text.isprintable():
        return text
    keep = "\n\t" if multiline else ""
    return "".join(
        _escape(ch) if ch not in keep and unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
        for ch in text
    )
