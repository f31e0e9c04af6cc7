"""Clean-up of MOSS-TTSD dialogue scripts, following the rules of the upstream TTSD app
(OpenMOSS/MOSS-TTS ``clis/moss_ttsd_app.py``): ``[1]`` becomes ``[S1]``, quotes and brackets go,
laughter becomes ``[笑]`` / ``[laugh]``, dashes and ellipses become commas, clause punctuation
becomes commas with the last mark of a turn kept, and consecutive turns of one speaker merge.
"""

from __future__ import annotations

import re

_DROPPED = re.compile("[" + re.escape('【】《》（）『』「」"-_“”～~‘’') + "]")
_TURN_START = re.compile(r"(?=\[S\d+\])")
_TAGGED = re.compile(r"^(\[S\d+\])\s*(.*)", re.DOTALL)
_PAUSES = ("——", "……", "...", "⸺", "―", "—", "…")
_CLAUSE_MARKS = str.maketrans({"；": "，", ";": ",", "：": "，", ":": ",", "、": "，"})
_PUNCT_RUN = re.compile(r"([，。？！,.?!])[，。？！,.?!]+")


def _clean_turn(content: str) -> str:
    content = _DROPPED.sub("", content)
    content = re.sub(r"哈{2,}", "[笑]", content)
    content = re.sub(r"\b(ha(\s*ha)+)\b", "[laugh]", content, flags=re.IGNORECASE)
    for mark in _PAUSES:
        content = content.replace(mark, "，")
    content = _PUNCT_RUN.sub(r"\1", content.translate(_CLAUSE_MARKS).strip())
    if len(content) > 1:
        # Inside a turn full stops become commas; a turn ending on a comma ends on a full stop.
        last = {"，": "。", ",": "."}.get(content[-1], content[-1])
        content = content[:-1].replace("。", "，") + last
    return content


def normalize_dialogue(script: str) -> str:
    """``[S1] ... [S2] ...`` script -> the cleaned single-line form the TTSD app feeds the model."""
    script = re.sub(r"\[(\d+)\]", r"[S\1]", script).replace("\n", " ")
    turns: list[tuple[str, str]] = []
    for piece in _TURN_START.split(script):
        piece = piece.strip()
        if not piece:
            continue
        match = _TAGGED.match(piece)
        tag, content = match.groups() if match else ("", piece)
        content = _clean_turn(content)
        if turns and tag and turns[-1][0] == tag:
            turns[-1] = (tag, turns[-1][1] + content)
        else:
            turns.append((tag, content))
    return "".join(f"{tag}{content}".strip() for tag, content in turns)
