"""Search terms for plans, pure: what a plan is indexed under and what a query asks for.

Postgres' text search splits words at spaces and punctuation, which Chinese text has
none of, and pg_trgm finds no trigrams in it on a database with the C locale (the stack's:
``show_trgm('学习计划')`` is empty there). So the plaza makes its own lexemes and hands
them to Postgres as they are (a ``tsvector`` and a ``tsquery`` of quoted lexemes with
their positions), with no database locale deciding what a letter is:

- a run of letters and digits outside the CJK scripts is a word, case-folded (NFKC); a
  query word matches words that start with it (``'plan':*``);
- a run of CJK characters is indexed as each character and each pair of neighbours (the
  bigrams Lucene's CJK analyser uses): a query of one character matches the character, a
  longer one matches its bigrams in sequence (``'学习' <-> '习计' <-> '计划'``), which is
  the phrase itself wherever it stands, with no dictionary to segment words.
"""

from __future__ import annotations

import re
import unicodedata

# Han (with extensions A and the compatibility block), Hiragana, Katakana, Hangul.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
RUNS = re.compile(f"([{CJK}]+)|([^\\W_{CJK}]+)")
MAX_WORD = 64  # longer "words" are noise (hashes, base64); truncated so a lexeme stays small
MAX_QUERY_TERMS = 12


def _runs(text: str) -> list[tuple[bool, str]]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [(bool(m[1]), m[0]) for m in RUNS.finditer(folded)]


MAX_POSITION = 16383  # Postgres' largest lexeme position


def vector(*texts: str) -> str:
    """The ``tsvector`` text of a plan with these texts: each lexeme with its positions.

    A CJK run's i-th character and the bigram starting there share a position, so the
    bigrams of a phrase stand at consecutive positions and ``<->`` finds them in order."""
    positions: dict[str, list[int]] = {}
    at = 1
    for text in texts:
        for cjk, run in _runs(text):
            if cjk:
                for i, char in enumerate(run):
                    positions.setdefault(char, []).append(min(at + i, MAX_POSITION))
                    if i + 1 < len(run):
                        positions.setdefault(run[i : i + 2], []).append(min(at + i, MAX_POSITION))
                at += len(run) + 1
            else:
                positions.setdefault(run[:MAX_WORD], []).append(min(at, MAX_POSITION))
                at += 1
        at += 1  # texts do not run into each other
    # Postgres keeps at most 256 positions of a lexeme; the first ones are enough to match.
    return " ".join(f"{_quote(lexeme)}:{','.join(map(str, sorted(set(spots))[:256]))}"
                    for lexeme, spots in sorted(positions.items()))  # fmt: skip


def _quote(lexeme: str) -> str:
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def tsquery(query: str) -> str | None:
    """The ``tsquery`` text of a search box's contents (every term must match), or None when
    it has no searchable term (only spaces or punctuation)."""
    terms: list[str] = []
    for cjk, run in _runs(query)[:MAX_QUERY_TERMS]:
        if not cjk:
            terms.append(_quote(run[:MAX_WORD]) + ":*")
        elif len(run) == 1:
            terms.append(_quote(run))
        else:
            pairs = [_quote(run[i : i + 2]) for i in range(len(run) - 1)]
            terms.append("(" + " <-> ".join(pairs) + ")")
    return " & ".join(terms) if terms else None
