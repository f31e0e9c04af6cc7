"""The text history a session sends to the LLM, and its trimming policy.

The engine owns the acoustic context (KV cache); this owns the words. The system prompt is always
kept; beyond ``max_messages`` or ``max_chars`` the oldest messages go first, and the kept part never
starts with an assistant message (chat templates expect a user message after the system prompt).
"""

from __future__ import annotations

from typing import Literal

from moss_agent.config import HistoryConfig

Role = Literal["user", "assistant"]
ChatMessage = dict[str, str]


class History:
    def __init__(self, system_prompt: str | None, config: HistoryConfig | None = None) -> None:
        self.system_prompt = system_prompt
        self.config = config or HistoryConfig()
        self._turns: list[ChatMessage] = []
        self.trimmed = 0

    def __len__(self) -> int:
        return len(self._turns)

    def add(self, role: Role, text: str) -> None:
        """Append a message; consecutive messages of one role merge (two user utterances in a row)."""
        text = text.strip()
        if not text:
            return
        if self._turns and self._turns[-1]["role"] == role:
            self._turns[-1] = {"role": role, "content": f"{self._turns[-1]['content']} {text}"}
        else:
            self._turns.append({"role": role, "content": text})
        self._trim()

    def _trim(self) -> None:
        def size() -> int:
            return sum(len(m["content"]) for m in self._turns)

        while len(self._turns) > 1 and (len(self._turns) > self.config.max_messages or size() > self.config.max_chars):
            self._turns.pop(0)
            self.trimmed += 1
        while len(self._turns) > 1 and self._turns[0]["role"] == "assistant":
            self._turns.pop(0)
            self.trimmed += 1

    def messages(self) -> list[ChatMessage]:
        """System prompt (if any) then the kept turns, as OpenAI chat messages (copies)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [dict(m) for m in self._turns]

    def clear(self) -> None:
        self._turns.clear()
