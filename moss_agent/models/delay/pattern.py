"""The delay pattern and the split of generated rows into audio code segments.

Codebook k of frame t sits on row t + k; rows outside any audio span carry the pad code in every
audio channel. The engine hands each returned segment ([T, n_vq]) to the codec.
"""

from __future__ import annotations

import torch

from moss_agent.errors import ConfigError


def apply_delay(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """codes: [T, n] -> [T + n - 1, n] with column k shifted down by k rows, pad elsewhere."""
    frames, n_vq = codes.shape
    out = codes.new_full((frames + n_vq - 1, n_vq), pad_code)
    for k in range(n_vq):
        out[k : k + frames, k] = codes[:, k]
    return out


def remove_delay(delayed: torch.Tensor) -> torch.Tensor:
    """delayed: [L, n] -> [L - n + 1, n], the inverse of ``apply_delay``."""
    rows, n_vq = delayed.shape
    frames = rows - n_vq + 1
    if frames < 1:
        return delayed.new_zeros((0, n_vq))
    return torch.stack([delayed[k : k + frames, k] for k in range(n_vq)], dim=1)


def split_segments(codes: torch.Tensor, pad_code: int) -> list[torch.Tensor]:
    """codes: [T, n] -> maximal runs of rows that are not all pad, each [T_i, n].

    Upstream passes run *positions* to ``torch.split`` (which wants sizes) and crashes on a second
    segment; here every run is returned.
    """
    keep = ~(codes == pad_code).all(dim=1)
    segments: list[torch.Tensor] = []
    start = None
    for index, flag in enumerate([*keep.tolist(), False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            segments.append(codes[start:index])
            start = None
    return segments


def rows_to_segments(rows: torch.Tensor, *, pad_code: int, delayed: bool) -> list[torch.Tensor]:
    """rows: generated ids [L, 1 + n] (from the audio_start row on) -> audio code segments [T_i, n]."""
    audio = rows[:, 1:]
    if delayed:
        audio = remove_delay(audio)
    return split_segments(audio, pad_code)


def check_codes(codes: object, n_vq: int, audio_vocab_size: int, *, what: str) -> torch.Tensor:
    """Validate user-given audio codes: an integer tensor [T, n_vq] with values in [0, audio_vocab_size)."""
    if not isinstance(codes, torch.Tensor):
        raise ConfigError(f"{what} must be a tensor of codec codes [T, {n_vq}], got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ConfigError(
            f"{what} must hold integer codec codes, got dtype {codes.dtype}; encode audio first"
        )
    if codes.dim() != 2 or codes.shape[1] != n_vq:
        raise ConfigError(
            f"{what} must have shape [T, {n_vq}] (frames, codebooks), got {tuple(codes.shape)}; "
            f"encode it with {n_vq} quantizers and transpose the codec output [nq, B, N]"
        )
    if codes.shape[0] == 0:
        raise ConfigError(f"{what} is empty (0 frames); give at least one frame of audio")
    if int(codes.min()) < 0 or int(codes.max()) >= audio_vocab_size:
        raise ConfigError(
            f"{what} holds codes outside [0, {audio_vocab_size}); pad codes are not allowed here"
        )
    return codes.to(device="cpu", dtype=torch.long)
