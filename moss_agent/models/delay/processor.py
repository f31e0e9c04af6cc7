"""Prompt building for the MOSS batch TTS models (Delay and Local v1) from messages holding audio codes.

The prompt format follows the upstream processors (OpenMOSS/MOSS-TTS ``moss_tts_delay`` and
``moss_tts_local`` ``processing_moss_tts.py``): ChatML messages rendered one at a time, the
``<user_inst>`` field template, ``<|audio|>`` placeholders expanded into slot tokens, one tokenizer
pass, then the audio channels laid under the slot rows (delayed for Delay, plain for Local).
Audio is always given as codes [T, n_vq]: the engine owns the codec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from moss_agent.errors import CheckpointError, ConfigError
from moss_agent.models.delay.config import ARCH_DELAY, TTSModelConfig
from moss_agent.models.delay.normalize import normalize_tts_text
from moss_agent.models.delay.pattern import apply_delay, check_codes

AUDIO_PLACEHOLDER = "<|audio|>"
Mode = Literal["generation", "continuation"]

_USER_TEMPLATE = (
    "<user_inst>\n- Reference(s):\n{reference}\n- Instruction:\n{instruction}\n- Tokens:\n{tokens}\n"
    "- Quality:\n{quality}\n- Sound Event:\n{sound_event}\n- Ambient Sound:\n{ambient_sound}\n"
    "- Language:\n{language}\n- Text:\n{text}\n</user_inst>"
)


@dataclass(frozen=True)
class Message:
    """One chat turn: ``content`` with one ``<|audio|>`` per entry of ``audio`` (codes [T, n_vq])."""

    role: Literal["user", "assistant"]
    content: str
    audio: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class BatchPrompt:
    """input_ids: [B, L, 1 + n_vq] left padded; attention_mask: [B, L] bool (False on padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _field(value: object) -> str:
    return str(value)


class TTSProcessor:
    """Builds prompts for one Delay or Local v1 checkpoint.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the checkpoint's tokenizer.json).
    Delay normalises ``text`` with ``normalize_tts_text`` as upstream does; Local v1 does not.
    """

    def __init__(self, tokenizer: object, config: TTSModelConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.delayed = config.architecture == ARCH_DELAY
        self.normalize_text = self.delayed
        names = {}
        for attr in (
            "audio_start_token_id",
            "audio_end_token_id",
            "audio_user_slot_token_id",
            "audio_assistant_gen_slot_token_id",
            "audio_assistant_delay_slot_token_id",
            "im_start_token_id",
            "im_end_token_id",
            "pad_token_id",
        ):
            token_id = getattr(config, attr)
            name = tokenizer.id_to_token(token_id)  # type: ignore[attr-defined]
            if name is None:
                raise CheckpointError(f"the tokenizer has no token with id {token_id} ({attr})")
            names[attr] = name
        self._names = names
        self.audio_start_token = names["audio_start_token_id"]
        self.audio_end_token = names["audio_end_token_id"]
        self.user_slot_token = names["audio_user_slot_token_id"]
        self.gen_slot_token = names["audio_assistant_gen_slot_token_id"]
        self.delay_slot_token = names["audio_assistant_delay_slot_token_id"]

    @classmethod
    def from_folder(cls, folder: str | Path, config: TTSModelConfig) -> TTSProcessor:
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"{folder} has no tokenizer.json; copy the tokenizer files next to the weights"
            )
        return cls(Tokenizer.from_file(str(path)), config)

    # ------------------------------------------------------------------ messages

    def user_message(
        self,
        text: str | None = None,
        reference: list[torch.Tensor | None] | torch.Tensor | None = None,
        instruction: str | None = None,
        tokens: int | None = None,
        quality: str | None = None,
        sound_event: str | None = None,
        ambient_sound: str | None = None,
        language: str | None = None,
    ) -> Message:
        """The ``<user_inst>`` message. ``reference`` entries that are None are skipped but keep their
        speaker index (``[None, codes]`` renders ``[S2]``). Unset fields render as ``None``."""
        if reference is not None and not isinstance(reference, list):
            reference = [reference]
        if text is not None and self.normalize_text:
            text = normalize_tts_text(text)
        audio: list[torch.Tensor] = []
        if reference is None:
            reference_text = "None"
        else:
            lines = []
            for index, codes in enumerate(reference):
                if codes is None:
                    continue
                lines.append(f"[S{index + 1}]:\n{AUDIO_PLACEHOLDER}")
                audio.append(self._codes(codes, what=f"reference for speaker S{index + 1}"))
            reference_text = "\n".join(lines)
        values = {
            "reference": reference_text,
            "instruction": instruction,
            "tokens": tokens,
            "quality": quality,
            "sound_event": sound_event,
            "ambient_sound": ambient_sound,
            "language": language,
            "text": text,
        }
        content = _USER_TEMPLATE
        for key, value in values.items():
            content = content.replace("{" + key + "}", _field(value))
        return Message("user", content, audio)

    def assistant_message(self, audio: list[torch.Tensor], content: str = AUDIO_PLACEHOLDER) -> Message:
        return Message("assistant", content, [self._codes(c, what="assistant audio") for c in audio])

    def _codes(self, codes: torch.Tensor, *, what: str) -> torch.Tensor:
        return check_codes(codes, self.config.n_vq, self.config.audio_vocab_size, what=what)

    # ------------------------------------------------------------------ prompts

    def __call__(
        self, conversations: list[list[Message]], mode: Mode | list[Mode] = "generation"
    ) -> BatchPrompt:
        """Build and left-pad a batch; ``mode`` may be one value or one per conversation.

        ``conversations`` is a list of conversations, each a list of :class:`Message`: one
        conversation of several messages is ``proc([[user, assistant]])``, not ``proc([user, assistant])``.
        """
        _check_conversations(conversations)
        modes = [mode] * len(conversations) if isinstance(mode, str) else list(mode)
        if len(modes) != len(conversations):
            raise ConfigError(f"got {len(modes)} modes for {len(conversations)} conversations")
        if not conversations:
            raise ConfigError("no conversations to build a prompt from")
        return self.pad([self.build(conv, m) for conv, m in zip(conversations, modes, strict=True)])

    def build(self, conversation: list[Message], mode: Mode = "generation") -> torch.Tensor:
        """One conversation -> rows [L, 1 + n_vq].

        generation: odd length, ends with a user message; the assistant prompt is appended
        (Local also appends an ``<|audio_start|>`` row, Delay lets the model emit it).
        continuation: even length, ends with assistant audio, cut after its last frame's gen-slot row.
        """
        if mode not in ("generation", "continuation"):
            raise ConfigError(f"mode must be 'generation' or 'continuation', got {mode!r}")
        _check_messages(conversation, "conversation")
        if not conversation:
            raise ConfigError("a conversation needs at least one user message")
        last_role = conversation[-1].role
        if mode == "generation" and (len(conversation) % 2 == 0 or last_role != "user"):
            raise ConfigError("generation mode needs an odd number of messages ending with a user message")
        if mode == "continuation" and (len(conversation) % 2 == 1 or last_role != "assistant"):
            raise ConfigError(
                "continuation mode needs user/assistant pairs ending with an assistant audio message"
            )
        if mode == "continuation" and not conversation[-1].audio:
            raise ConfigError("continuation mode needs audio codes in the last assistant message")
        parts = []
        for index, message in enumerate(conversation):
            last = index == len(conversation) - 1
            text = f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n"
            if mode == "generation" and last:
                text += "<|im_start|>assistant\n"
            parts.append(self._rows(message, text, truncate=mode == "continuation" and last))
        rows = torch.cat(parts)
        if mode == "generation" and not self.delayed:
            start = rows.new_full((1, rows.shape[1]), self.config.audio_pad_code)
            start[0, 0] = self.config.audio_start_token_id
            rows = torch.cat([rows, start])
        return rows

    def _rows(self, message: Message, text: str, *, truncate: bool) -> torch.Tensor:
        config = self.config
        n_vq = config.n_vq
        self._check_no_control_tokens(message)
        audio = list(message.audio)
        if text.count(AUDIO_PLACEHOLDER) != len(audio):
            raise ConfigError(
                f"a {message.role} message has {text.count(AUDIO_PLACEHOLDER)} {AUDIO_PLACEHOLDER} "
                f"placeholders but {len(audio)} audio code tensors"
            )
        text, audio = _merge_adjacent_placeholders(text, audio)
        if message.role == "user":
            gen_slot = delay_slot = self.user_slot_token
        else:
            gen_slot, delay_slot = self.gen_slot_token, self.delay_slot_token
        blocks = iter(audio)

        def expand(_: re.Match[str]) -> str:
            frames = len(next(blocks))
            tail = delay_slot * (n_vq - 1) if self.delayed else ""
            return self.audio_start_token + gen_slot * frames + tail + self.audio_end_token

        text = re.sub(re.escape(AUDIO_PLACEHOLDER), expand, text)
        ids = torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)  # type: ignore[attr-defined]
        starts = (ids == config.audio_start_token_id).nonzero().flatten().tolist()
        if len(starts) != len(audio):
            raise ConfigError(
                f"the {message.role} text holds audio start/end markers of its own; remove them"
            )
        audio_rows = ids.new_full((len(ids), n_vq), config.audio_pad_code)
        for start, codes in zip(starts, audio, strict=True):
            block = apply_delay(codes, config.audio_pad_code) if self.delayed else codes
            audio_rows[start + 1 : start + 1 + len(block)] = block
        if truncate:
            # Keep up to the last frame's gen-slot row: the model regenerates what follows.
            end = starts[-1] + 1 + len(audio[-1])
            ids, audio_rows = ids[:end], audio_rows[:end]
        return torch.cat([ids[:, None], audio_rows], dim=1)

    def _check_no_control_tokens(self, message: Message) -> None:
        stripped = message.content.replace(AUDIO_PLACEHOLDER, "")
        for name in self._names.values():
            if name in stripped:
                raise ConfigError(f"the {message.role} text contains the control token {name}; remove it")

    def pad(self, rows: list[torch.Tensor]) -> BatchPrompt:
        """Left-pad rows [L_i, 1 + n] with pad text / pad codes -> BatchPrompt."""
        longest = max(r.shape[0] for r in rows)
        width = rows[0].shape[1]
        input_ids = torch.full((len(rows), longest, width), self.config.audio_pad_code, dtype=torch.long)
        input_ids[..., 0] = self.config.pad_token_id
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for index, r in enumerate(rows):
            input_ids[index, longest - r.shape[0] :] = r
            mask[index, longest - r.shape[0] :] = True
        return BatchPrompt(input_ids=input_ids, attention_mask=mask)

    # ------------------------------------------------------------------ outputs

    def decode_text(self, text_ids: torch.Tensor, skip: int = 0) -> str:
        """Text channel of generated rows -> string, audio blocks shown as ``<|audio|>``.

        Upstream builds this regex without escaping the token names, so ``|`` turns it into an
        alternation that deletes stray characters; here the names are escaped.
        """
        ids = [int(i) for i in text_ids.tolist()]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]
        prefix = self.tokenizer.decode(ids[:skip], skip_special_tokens=False)  # type: ignore[attr-defined]
        text = text[len(prefix) :]
        pattern = re.compile(
            f"(?:{re.escape(self.audio_start_token)})?(?:{re.escape(self.gen_slot_token)})*"
            f"(?:{re.escape(self.delay_slot_token)})*{re.escape(self.audio_end_token)}"
        )
        return pattern.sub(lambda m: AUDIO_PLACEHOLDER if self.gen_slot_token in m.group(0) else "", text)


def _describe(value: object) -> str:
    if isinstance(value, list | tuple):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(kinds) or 'empty'})"
    return f"a {type(value).__name__}"


def _check_messages(conversation: object, what: str) -> None:
    """A conversation must be a list of Message; anything else gets an error naming what came instead."""
    if not isinstance(conversation, list | tuple) or not all(isinstance(m, Message) for m in conversation):
        raise ConfigError(f"{what} must be a list of Message, got {_describe(conversation)}")


def _check_conversations(conversations: object) -> None:
    """Upstream treats a flat message list as one-message conversations and fails deep inside; say so here."""
    if isinstance(conversations, list | tuple) and any(isinstance(c, Message) for c in conversations):
        raise ConfigError(
            "expected a list of conversations, each a list of Message, as in proc([[user, assistant]]); got "
            f"{_describe(conversations)}, a flat message list: wrap one conversation in a list, proc([messages])"
        )
    if not isinstance(conversations, list | tuple):
        raise ConfigError(
            f"expected a list of conversations, each a list of Message; got {_describe(conversations)}"
        )
    for index, conversation in enumerate(conversations):
        _check_messages(conversation, f"conversation {index}")


def _merge_adjacent_placeholders(text: str, audio: list[torch.Tensor]) -> tuple[str, list[torch.Tensor]]:
    """Placeholders separated only by whitespace become one, their codes joined in time."""
    matches = list(re.finditer(re.escape(AUDIO_PLACEHOLDER), text))
    if len(matches) <= 1:
        return text, audio
    pieces: list[str] = []
    merged: list[torch.Tensor] = []
    cursor = 0
    index = 0
    while index < len(matches):
        last = index
        while last + 1 < len(matches) and not text[matches[last].end() : matches[last + 1].start()].strip():
            last += 1
        pieces.append(text[cursor : matches[index].start()] + AUDIO_PLACEHOLDER)
        merged.append(torch.cat(audio[index : last + 1]))
        cursor = matches[last].end()
        index = last + 1
    pieces.append(text[cursor:])
    return "".join(pieces), merged
