"""Final-answer extraction from model completions and dataset answer fields.

Rules, in order (the first rule that yields an answer wins):

1. the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``);
2. the last GSM8K-style ``#### 42`` line;
3. the last "the answer is X" / "The final answer is X" phrase;
4. optionally, the last number anywhere in the text.

Everything here runs in time linear in the input: completions in RL are
untrusted and can be 100k characters of garbage, so we never apply a regex
that can backtrack over the whole text. ``\\boxed`` is located with
``str.rfind`` and its braces are matched by a hand-written scanner.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "leading_number"]

# Macros whose argument is the final answer. ``\fbox`` is what some MATH
# solutions (and models imitating them) use instead of ``\boxed``.
_BOX_MACROS = ("\\boxed", "\\fbox")

# A number as it appears in prose: optional sign, digits with optional
# thousands separators, optional decimal part, optional "/denominator".
# Every quantifier is over a disjoint character class or a fixed-width group,
# so matching is linear. The sign must not follow a word character or ")",
# so "5-3" yields "5" and "3", not "-3".
_NUMBER = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_LEADING_NUMBER_RE = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")

# "the answer is", "The final answer is", "my answer is".
_ANSWER_PHRASE_RE = re.compile(r"answer\s+is", re.IGNORECASE)
# A period ends the sentence only if followed by whitespace or the end of the
# line: "3.5" keeps its decimal point.
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def _match_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1 if unbalanced.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` (literal
    braces in LaTeX sets) do not count, while ``\\\\{`` (line break, then a
    group) does.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _last_box_macro(text: str) -> tuple[int, int]:
    """(start, end) of the last ``\\boxed``/``\\fbox`` macro name, or (-1, -1).

    Occurrences followed by a letter are a different macro (``\\boxedanswer``)
    and are skipped. Each macro's search resumes left of its previous hit, so
    the text is scanned once per macro however many false hits there are.
    """
    hits = {macro: text.rfind(macro) for macro in _BOX_MACROS}
    while True:
        macro, pos = max(hits.items(), key=lambda item: item[1])
        if pos < 0:
            return -1, -1
        after = pos + len(macro)
        if after < len(text) and text[after].isalpha():
            hits[macro] = text.rfind(macro, 0, pos)
            continue
        return pos, after


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}``/``\\fbox{...}`` in ``text``.

    Returns None when there is no box, when the last box is unbalanced
    (generation was cut off mid-answer: an earlier box is not the model's final
    answer, so we do not fall back to it) or when it is empty.
    """
    start, i = _last_box_macro(text)
    if start < 0:
        return None
    n = len(text)
    j = i
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        close = _match_brace(text, j)
        if close < 0:
            return None
        content = text[j + 1 : close].strip()
        return content or None
    if j == i:
        # "\boxed" directly followed by a non-letter, non-brace (e.g. "\boxed$"):
        # not an argument we can read.
        return None
    # "\boxed 5": TeX takes a single token; models mean the whole word, so read
    # up to whitespace, "$" or a closing brace of the surrounding group.
    k = j
    while k < n and text[k] not in " \t\r\n$}":
        k += 1
    content = text[j:k].rstrip(".,;")
    return content or None


def leading_number(phrase: str) -> str | None:
    """The number at the start of ``phrase`` if it stands alone as a word.

    "42 apples" -> "42", "1,234." -> "1,234", but "2x+1" -> None (the digit is
    part of an expression, so the whole phrase is the answer).
    """
    m = _LEADING_NUMBER_RE.match(phrase)
    if m is None:
        return None
    rest = phrase[m.end() :]
    if rest[:1] == "," and rest[1:].lstrip()[:1].isdigit():
        return None  # "1, 2, 3" is a list: the whole phrase is the answer
    if rest == "" or rest[0].isspace() or rest[0] in ".,;:!?)":
        return m.group(0).replace("−", "-")
    return None


def _clean_phrase(phrase: str) -> str | None:
    """Trim a free-text answer: keep a leading number, else drop decoration."""
    phrase = phrase.strip().strip("*").strip()  # markdown bold: **42**
    # "$42$" / "\$42" / "$\frac{1}{2}$": the dollars are math delimiters or currency.
    phrase = phrase.replace("\\$", "").strip("$").strip()
    num = leading_number(phrase)
    if num is not None:
        return num
    phrase = phrase.rstrip(".").strip().strip("$").strip()
    return phrase or None


def _extract_gsm8k(text: str) -> str | None:
    """Answer after the last ``####`` marker.

    A ``####`` followed by a word (or nothing) is a markdown heading
    ("#### Step 1"), not an answer marker, so it is skipped in favour of
    earlier markers. Markers are visited right to left and each newline
    search stops at the previous marker, keeping the scan linear.
    """
    n = len(text)
    next_pos, next_line_end = n, n
    while True:
        pos = text.rfind("####", 0, next_pos)
        if pos < 0:
            return None
        newline = text.find("\n", pos, next_pos)
        line_end = newline if newline >= 0 else next_line_end
        next_pos, next_line_end = pos, line_end
        i = pos + 4
        while i < line_end and text[i].isspace():
            i += 1
        if i == line_end or text[i].isalpha() or text[i] in "#*":
            continue
        return _clean_phrase(text[i:line_end])


def _extract_answer_phrase(text: str) -> str | None:
    """X in the last "... answer is X" (case-insensitive)."""
    last = None
    for last in _ANSWER_PHRASE_RE.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    n = len(text)
    # Skip ":" and whitespace, including a line break ("The answer is:\n42").
    while i < n and (text[i].isspace() or text[i] == ":"):
        i += 1
    line_end = text.find("\n", i)
    line = text[i : line_end if line_end >= 0 else n]
    end = _SENTENCE_END_RE.search(line)
    if end is not None:
        line = line[: end.start()]
    return _clean_phrase(line)


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last.group(0) if last is not None else None


def extract_answer(text: str, fallback_last_number: bool = False) -> str | None:
    """Extract the final answer from a completion (or a dataset answer field).

    Args:
        text: model completion, GSM8K answer field ("... #### 72") or MATH
            solution ("... \\boxed{\\frac{1}{2}}").
        fallback_last_number: if no explicit answer marker is found, use the
            last number in the text. Off by default: rewarding a stray number
            teaches the policy to skip the answer format.

    Returns:
        The answer string (not normalised), or None if none was found.
    """
    if not text:
        return None
    for rule in (extract_boxed, _extract_gsm8k, _extract_answer_phrase):
        answer = rule(text)
        if answer:
            return answer
    if fallback_last_number:
        return _last_number(text)
    return None
