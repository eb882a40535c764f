"""Cheap, exact answer comparison that decides most cases without sympy.

GSM8K and most MATH answers are plain numbers, so normalising the surface
form (``$1,000``, ``\\dfrac{1}{2}``, ``5\\text{ cm}``) and comparing exact
rationals settles them in microseconds. Only answers that are not both
numbers and not string-identical go to math-verify (see ``verify.py``).

Inputs here are already-extracted answers whose length the caller has capped,
so the regexes below only ever see short strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["fast_equal", "normalize_answer", "parse_number"]

# Spacing macros carry no meaning in an answer; "\ " is an explicit space.
_SPACING = ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad")
# \left( ... \right) sizing; the lookahead keeps \leftarrow/\rightarrow intact.
_SIZING_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
# "\frac12" / "\frac1{2}" / "\frac{1}2": TeX reads a bare digit as an argument.
_FRAC_BARE_NUM_RE = re.compile(r"\\frac\s*(\d)")
_FRAC_BARE_DEN_RE = re.compile(r"(\\frac\{[^{}]*\})\s*(\d)")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_TRAILING_UNIT_RE = re.compile(r"\\(?:text|textrm|mathrm|mbox)\{[^{}]*\}\s*$")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WHITESPACE_RE = re.compile(r"\s+")

_DECIMAL = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_DECIMAL_RE = re.compile(_DECIMAL)
_SLASH_RE = re.compile(rf"({_DECIMAL})/({_DECIMAL})")
_LATEX_FRAC_RE = re.compile(rf"([+-]?)\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}")


def normalize_answer(answer: str) -> str:
    """Canonical surface form of an answer, for exact comparison.

    Removes presentation-only markup: ``$``/``\\$`` (math delimiters and
    currency), ``%``/``\\%``, degree signs, spacing macros, ``\\left``/
    ``\\right``, a ``\\text{...}`` wrapper or trailing unit, a trailing period,
    thousands separators and all whitespace; rewrites ``\\dfrac``/``\\tfrac``
    and ``\\frac12`` to ``\\frac{1}{2}``. Percent is dropped rather than
    divided by 100 because datasets write "10\\%" for the answer "10".
    """
    s = answer.strip().replace("−", "-")  # unicode minus from chat models
    for macro in _SPACING:
        s = s.replace(macro, "")
    s = s.replace("\\ ", " ").replace("{,}", ",")  # 1{,}234 is LaTeX for 1,234
    s = _SIZING_RE.sub("", s)
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _FRAC_BARE_NUM_RE.sub(r"\\frac{\1}", s)
    s = _FRAC_BARE_DEN_RE.sub(r"\1{\2}", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _DEGREE_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    whole = _TEXT_WRAP_RE.fullmatch(s)
    if whole is not None:
        s = whole.group(1).strip()  # \text{Monday} -> Monday
    else:
        unit = _TRAILING_UNIT_RE.search(s)
        # Drop "\text{ cm}" only after a number: elsewhere \text may be content.
        if unit is not None and _is_plain_number(s[: unit.start()].strip()):
            s = s[: unit.start()].strip()
    s = s.rstrip(".")
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return _WHITESPACE_RE.sub("", s)


def _is_plain_number(s: str) -> bool:
    return bool(_THOUSANDS_RE.fullmatch(s)) or parse_number(s) is not None


def parse_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, ``a/b`` or ``\\frac{a}{b}``; else None.

    Expects a normalised string (no spaces, no thousands separators).
    """
    try:
        if _DECIMAL_RE.fullmatch(s):
            return Fraction(s)
        m = _SLASH_RE.fullmatch(s)
        if m is not None:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = _LATEX_FRAC_RE.fullmatch(s)
        if m is not None:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) == "-" else value
    except (ZeroDivisionError, ValueError):
        # ValueError: over Python's 4300-digit int-conversion limit; such a
        # "number" is degenerate output, not an answer.
        return None
    return None


def fast_equal(pred: str, gold: str) -> bool | None:
    """Verdict without sympy, or None when math-verify has to decide.

    Two numbers are compared exactly (``0.5 == 1/2 == \\frac{1}{2}``, but
    ``0.333 != 1/3``): a definitive answer either way. Identical normalised
    strings are equal. Anything else (expressions, sets, one side symbolic)
    is undecided.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    p_num, g_num = parse_number(p), parse_number(g)
    if p_num is not None and g_num is not None:
        return p_num == g_num
    if p == g:
        return True
    return None
