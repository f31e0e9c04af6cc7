"""Robustness clean-up of TTS input text (no semantic expansion of numbers or units).

Behaviour matches the normaliser the upstream MossTTSDelay processor applies to ``text``
(OpenMOSS/MOSS-TTS ``moss_tts_delay/tts_robust_normalizer_single_script.py``), so prompt ids agree:
line breaks become "。", URLs / e-mails / @mentions / #tags / file and version names are shielded
from the rules, spaces are collapsed (removed inside CJK runs, kept between CJK and Latin words),
structural brackets, arrows and dash runs become sentence or clause boundaries, and runs of
repeated punctuation collapse. ``[...]`` and ``{...}`` (speaker tags, pauses, events) are kept.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_CJK_RANGE = "\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff"  # Han + kana: scripts written without spaces
_CJK = f"[{_CJK_RANGE}]"
_SHIELD = r"___PROT\d+___"
_LATIN_WORD = rf"(?:{_SHIELD}|(?=[A-Za-z0-9._/+:-]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9._/+:-]*)"

# Spans no rule may touch, in the order they are shielded.
_SHIELDED_SPANS = [
    re.compile(r"https?://[^\s\u3000，。！？；、）】》〉」』]+"),  # URL
    re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![\w.-])"),  # e-mail
    re.compile(r"(?<![A-Za-z0-9_])@[A-Za-z0-9_]{1,32}"),  # @mention
    re.compile(r"(?<![A-Za-z0-9_])(?:u|r)/[A-Za-z0-9_]+"),  # reddit user / board
    re.compile(r"(?<![A-Za-z0-9_])#(?!\s)[^\s#]+"),  # hashtag
    re.compile(r"(?<![A-Za-z0-9_])\.(?=[A-Za-z0-9._-]*[A-Za-z0-9])[A-Za-z0-9._-]+"),  # .dotfile
    re.compile(  # file names and versions: letters plus at least one of . _ / + : -
        r"(?<![A-Za-z0-9_])(?=[A-Za-z0-9._/+:-]*[A-Za-z])(?=[A-Za-z0-9._/+:-]*[._/+:-])"
        r"[A-Za-z0-9](?:[A-Za-z0-9._/+:-]*[A-Za-z0-9])?(?![A-Za-z0-9_])"
    ),
]

_Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _rules(*pairs: tuple[str, str | Callable[[re.Match[str]], str]]) -> list[_Rule]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


_SPACE_RULES = _rules(
    (r"[ \t\r\f\v]+", " "),
    (rf"({_CJK})\s+(?={_CJK})", r"\1"),  # no spaces inside CJK runs
    (rf"({_CJK})\s+(?=\d)", r"\1"),  # nor between CJK and digits
    (rf"(\d)\s+(?={_CJK})", r"\1"),
    (rf"({_CJK})(?=({_LATIN_WORD}))", r"\1 "),  # exactly one space between CJK and Latin words
    (rf"(({_LATIN_WORD}))(?={_CJK})", r"\1 "),
    (r" {2,}", " "),
    (r"\s+([，。！？；：、”’」』】）》])", r"\1"),  # none around CJK punctuation
    (r"([（【「『《“‘])\s+", r"\1"),
    (r"([，。！？；：、])\s*", r"\1"),
    (r"\s+([,.;!?])", r"\1"),  # none before ASCII punctuation
    (r" {2,}", " "),
)

_STRUCTURE_RULES = _rules(
    # Twice, so that adjacent bracketed headings all unwrap.
    (r"(^|[。！？!?；;]\s*)[【〖『「]([^】〗』」]+)[】〗』」]\s*", r"\1\2。"),
    (r"(^|[。！？!?；;]\s*)[【〖『「]([^】〗』」]+)[】〗』」]\s*", r"\1\2。"),
    # A title in 《》 standing alone as a sentence is unwrapped; one inside a sentence is kept.
    (r"(^|[。！？!?；;]\s*)《([^》]+)》(?=\s*(?:___PROT\d+___|[—–―-]{2,}|$|[。！？!?；;，,]))", r"\1\2"),
    (r"\s*(?:<[-=]+>|[-=]+>|<[-=]+|[→←↔⇒⇐⇔⟶⟵⟷⟹⟸⟺↦↤↪↩])\s*", "，"),  # arrows join clauses
    (r"\s*(?:—|–|―|-){2,}\s*", "。"),  # dash runs end a sentence
)


def _question_exclamation(match: re.Match[str]) -> str:
    run = match.group(0)
    question = any(ch in run for ch in "?？")
    exclaim = any(ch in run for ch in "!！")
    if question and exclaim:
        return "？！"
    return "？" if question else "！"


_REPEAT_RULES = _rules(
    (r"(?:\.{3,}|…{2,}|……+)", "。"),
    (r"[。．]{2,}", "。"),
    (r"[，,]{2,}", "，"),
    (r"[!！]{2,}", "！"),
    (r"[?？]{2,}", "？"),
    (r"[!?！？]{2,}", _question_exclamation),
)

_MARKDOWN_LINK = re.compile(r"\[([^\[\]]+?)\]\((https?://[^)\s]+)\)")
_LINE_PREFIXES = [re.compile(p) for p in (r"^#{1,6}\s+", r"^>\s+", r"^[-*+]\s+", r"^\d+[.)]\s+")]
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\ufeff]")


def _apply(rules: list[_Rule], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def _strip_controls(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ")
    text = _ZERO_WIDTH.sub("", text)
    return "".join(ch for ch in text if ch in "\n\t " or not unicodedata.category(ch).startswith("C"))


def _join_lines(text: str) -> str:
    text = _MARKDOWN_LINK.sub(r"\1 \2", text)
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        for prefix in _LINE_PREFIXES:
            line = prefix.sub("", line)
        lines.append(line)
    return "。".join(lines)


def normalize_tts_text(text: str) -> str:
    """Clean ``text`` for the TTS prompt; idempotent."""
    text = _join_lines(_strip_controls(text))
    shielded: list[str] = []

    def shield(match: re.Match[str]) -> str:
        shielded.append(match.group(0))
        return f"___PROT{len(shielded) - 1}___"

    for pattern in _SHIELDED_SPANS:
        text = pattern.sub(shield, text)
    text = _apply(_SPACE_RULES, text).strip()
    text = _apply(_STRUCTURE_RULES, text)
    text = _apply(_REPEAT_RULES, text)
    text = _apply(_SPACE_RULES, text).strip()
    for index, original in enumerate(shielded):
        text = text.replace(f"___PROT{index}___", original)
    return text.strip()
