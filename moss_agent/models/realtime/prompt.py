"""Prompt rows for MOSS-TTS-Realtime, laid out as the upstream streaming processor builds them.

A row is 1 + rvq ints: a text id, then one id per codebook (a code, or pad 1024 / BOS 1025 / EOS 1026).
- system block: the system message, plus a "context" message whose ``<|audio_pad|>`` rows carry the
  voice prompt frames one per row (no delay);
- user turn: ``<|im_end|>\\n<|im_start|>user\\n`` + text; the user's own audio, when given, uses the
  12-token delay layout (BOS on the 12th text token, or the last one for shorter text; frames from
  the next row; an EOS row; ``<|text_pad|>`` filling the text channel once the text runs out);
- assistant header: ``<|im_end|>\\n<|im_start|>assistant\\n``.
The doubled ``<|im_end|>\\n`` after the system block is upstream's streaming layout, kept on purpose.
Layout facts from reference/realtime-model.md section 6 (upstream MossTTSRealtimeProcessor).
"""

from __future__ import annotations

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
        return torch.cat([rows, self.text_rows(self.encode(ASSISTANT_HEADER))])

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
