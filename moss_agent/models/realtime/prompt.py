"""Prompt rows for MOSS-TTS-Realtime, laid out as the upstream streaming processor builds them.

A row is 1 + rvq ints: a text id, then one id per codebook (a code, or pad 1024 / BOS 1025 / EOS 1026).
- system block: the system message, plus a "context" message whose ``<|audio_pad|>`` rows carry the
  voice prompt frames one per row (no delay);
- user turn: ``<|im_end|>\\n<|im_start|>user\\n`` + text; the user's own audio, when given, uses the
  12-token delay layout (BOS on the 12th text token, or the last one for shorter text; frames from
  the next row; an EOS row; ``<|text_pad|>`` filling the text channel once the text runs out);
- assistant header: ``<|im_end|>\\n<|im_start|>assistant\\n``;
- an earlier turn given at open (``history_rows``): a user turn is its user block without the header;
  an assistant turn is the header, then its text and frames in the same 12-token delay layout,
  closed by the EOS row, exactly the rows a live turn leaves (see ``assistant_rows``).
The doubled ``<|im_end|>\\n`` after the system block is upstream's streaming layout, kept on purpose.
Layout facts from reference/realtime-model.md section 6 (upstream MossTTSRealtimeProcessor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moss_agent.errors import ConfigError
from moss_agent.models.realtime.config import DELAY_TOKENS, RealtimeConfig

UPSTREAM_SYSTEM_PROMPT = (
    "You are a highly expressive text-to-speech (TTS) engine developed by Mosi Intelligence. \n"
    "You possess natural language understanding, emotional modeling, and multi-style speech generation "
    "capabilities, allowing you to generate the corresponding speech based on the text given in the assistant."
)
VOICE_CONTEXT = "The assistant section should be synthesized using the following voice timbre:"
USER_PREFIX = "<|im_end|>\n<|im_start|>user\n"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"
AUDIO_PAD_TOKEN = "<|audio_pad|>"
TEXT_PAD_TOKEN = "<|text_pad|>"


@dataclass(frozen=True)
class EncodedTurn:
    """An earlier turn with its audio as codec codes [frames, nq] (None: no audio)."""

    role: str  # "user" or "assistant"
    text: str
    codes: torch.Tensor | None = None


class PromptBuilder:
    def __init__(self, tokenizer: Any, config: RealtimeConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.width = 1 + config.rvq

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_codes(self, codes: torch.Tensor, what: str) -> torch.Tensor:
        """codes [T, nq >= rvq] of real codec ids -> [T, rvq] long on the CPU."""
        rvq = self.config.rvq
        if codes.dim() != 2 or codes.shape[1] < rvq:
            raise ConfigError(
                f"{what} must be a [frames, codebooks] tensor with at least {rvq} codebooks, "
                f"got shape {tuple(codes.shape)}; transpose [codebooks, frames] codes first"
            )
        codes = codes[:, :rvq].to(device="cpu", dtype=torch.long)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ConfigError(
                f"{what} holds ids outside 0..{self.config.codebook_size - 1}; "
                "pass codec codes only (trim BOS/EOS/pad rows)"
            )
        return codes

    def text_rows(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), 1 + rvq]: the ids in the text channel, audio pad elsewhere."""
        rows = torch.full((len(ids), self.width), self.config.audio_pad, dtype=torch.long)
        rows[:, 0] = torch.tensor(ids, dtype=torch.long)
        return rows

    def system_rows(
        self, system_prompt: str | None = None, voice_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """System message (upstream text when None) and optional voice prompt codes [T, nq]."""
        text = "<|im_start|>system\n" + (UPSTREAM_SYSTEM_PROMPT if system_prompt is None else system_prompt)
        text += "<|im_end|>\n"
        frames = None
        if voice_codes is not None:
            frames = self.check_codes(voice_codes, "voice_codes")
            if frames.shape[0] == 0:
                frames = None
        if frames is not None:
            text += (
                "<|im_start|>context\n" + VOICE_CONTEXT + AUDIO_PAD_TOKEN * frames.shape[0] + "<|im_end|>\n"
            )
        rows = self.text_rows(self.encode(text))
        if frames is not None:
            where = (rows[:, 0] == self.config.audio_pad_text_id).nonzero().flatten()
            first, last = int(where[0]), int(where[-1])
            if last - first + 1 != frames.shape[0]:
                raise ConfigError("the system prompt text must not contain <|audio_pad|>")
            rows[first : last + 1, 1:] = frames
        return rows

    def user_rows(self, user_text: str | None, user_codes: torch.Tensor | None) -> torch.Tensor:
        """The user's turn and the assistant header; with no text and no audio, only the header."""
        if user_codes is None:
            if user_text is None:
                return self.text_rows(self.encode(ASSISTANT_HEADER))
            return self.text_rows(self.encode(USER_PREFIX + user_text + ASSISTANT_HEADER))
        return torch.cat([self._user_audio_block(user_text, user_codes), self.text_rows(self.encode(ASSISTANT_HEADER))])

    def _user_audio_block(self, user_text: str | None, user_codes: torch.Tensor) -> torch.Tensor:
        frames = self.check_codes(user_codes, "user_codes")
        text = user_text or ""
        audio_len = frames.shape[0]
        text_len = len(self.encode(text))
        prefix_len = len(self.encode(USER_PREFIX))
        if text_len >= DELAY_TOKENS:
            pads = max(audio_len + DELAY_TOKENS - text_len + 1, 0)
            rows = self.text_rows(self.encode(USER_PREFIX + text + TEXT_PAD_TOKEN * pads))
            bos = prefix_len + DELAY_TOKENS - 1
        else:
            rows = self.text_rows(self.encode(USER_PREFIX + text + TEXT_PAD_TOKEN * (audio_len + 1)))
            bos = rows.shape[0] - audio_len - 2
        rows[bos, 1] = self.config.audio_bos
        rows[bos + 1 : bos + 1 + audio_len, 1:] = frames
        rows[bos + 1 + audio_len, 1] = self.config.audio_eos
        return rows

    def assistant_rows(self, text: str, codes: torch.Tensor) -> torch.Tensor:
        """A finished assistant turn: the header, then its text and frames (codes [T, nq]) as a live
        turn leaves them in the context.

        The text is tokenized on its own (as the engine tokenizes streamed text: the same ids as the
        whole text at once). BOS sits on the 12th text token (the last one for shorter text), frame
        f in the row of text token ``prefill + f`` (``<|text_pad|>`` once the text runs out), and
        the EOS row ``[<|text_pad|>, 1026, pad...]`` closes the turn. That is the 6.2 layout except
        where a live turn differs from it: text more than 12 tokens beyond the last frame is left
        out (a live turn that stops before its text ends never reads it), and the EOS row's text
        channel is always ``<|text_pad|>``.
        """
        frames = self.check_codes(codes, "assistant codes")
        ids = self.encode(text)
        header = self.encode(ASSISTANT_HEADER)
        audio_len = frames.shape[0]
        prefill = min(len(ids), DELAY_TOKENS)
        spoken = ids[: prefill + audio_len]
        pads = prefill + audio_len - len(spoken)
        rows = self.text_rows(header + spoken + [self.config.text_pad_id] * pads)
        bos = len(header) + prefill - 1
        rows[bos, 1] = self.config.audio_bos
        rows[bos + 1 : bos + 1 + audio_len, 1:] = frames
        return torch.cat([rows, self.eos_row()[None]])

    def history_rows(self, turns: Sequence[EncodedTurn]) -> tuple[torch.Tensor, list[int]]:
        """Earlier turns -> (rows [L, 1 + rvq], the row where each turn block starts).

        A block is a user turn with the assistant turns after it (or an assistant turn with no user
        turn before it): the unit a live conversation trims. A user turn leaves out the assistant
        header, which the next assistant turn (or the next ``user_rows``) brings, so a history that
        ends with a user turn is answered by ``start_turn(user_text=None)``.
        """
        parts: list[torch.Tensor] = []
        starts: list[int] = []
        length, previous = 0, None
        for turn in turns:
            if turn.role == "user":
                if turn.codes is not None and turn.codes.shape[0] > 0:
                    rows = self._user_audio_block(turn.text, turn.codes)
                else:
                    rows = self.text_rows(self.encode(USER_PREFIX + turn.text))
            elif turn.role == "assistant":
                if turn.codes is None or turn.codes.shape[0] == 0:
                    raise ConfigError("an assistant turn of the history needs its audio (at least one codec frame)")
                rows = self.assistant_rows(turn.text, turn.codes)
            else:
                raise ConfigError(f"a turn's role must be 'user' or 'assistant', got {turn.role!r}")
            if turn.role == "user" or previous != "user":
                starts.append(length)
            parts.append(rows)
            length += rows.shape[0]
            previous = turn.role
        if not parts:
            return torch.zeros(0, self.width, dtype=torch.long), []
        return torch.cat(parts), starts

    def audio_row(self, text_id: int, codes: torch.Tensor) -> torch.Tensor:
        """One row [1 + rvq]: a text id with a frame (codes [rvq])."""
        row = torch.empty(self.width, dtype=torch.long)
        row[0] = text_id
        row[1:] = codes
        return row

    def eos_row(self, text_id: int | None = None) -> torch.Tensor:
        """The row that closes an assistant turn in training: [text or <|text_pad|>, EOS, pad...]."""
        row = torch.full((self.width,), self.config.audio_pad, dtype=torch.long)
        row[0] = self.config.text_pad_id if text_id is None else text_id
        row[1] = self.config.audio_eos
        return row
