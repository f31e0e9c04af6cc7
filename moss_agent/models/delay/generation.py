"""Batched generation for MossTTSDelay: the per-sample delay state machine with a KV cache.

State machine and masks follow upstream ``MossTTSDelayModel.generate`` (OpenMOSS/MOSS-TTS).
Each step the text channel is either forced (delay-slot flush, then ``<|audio_end|>``) or sampled
under masks (outside audio: no pad / slots / audio_end; inside audio: only gen or delay slot), and
codebook k is sampled once the audio span is k rows old and until the flush has passed it.

Documented departures (``upstream_compatible=False``, the default): upstream samples every
codebook on the row where the model picks the first delay slot, so it emits one junk frame after
the last real one and a one-row-longer flush than training used. Here that row already counts as
the first flush row (codebooks >= 1 only), giving the training layout: T gen rows, n-1 delay rows.
The continuation prompt length is reported as frames (upstream counts the audio_start row too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams, sample_tokens
from moss_agent.models.delay.model import MossTTSDelayModel
from moss_agent.models.delay.pattern import rows_to_segments

log = logging.getLogger(__name__)

_NOT_FLUSHING = torch.iinfo(torch.long).max

StepCallback = Callable[[int, torch.Tensor], "bool | None"]


@dataclass
class GeneratedSample:
    """One sample's output.

    rows: [L, 1 + n_vq], the assistant ids from ``<|audio_start|>`` on (continuation: prompt rows included).
    segments: audio code segments [T_i, n_vq] for the codec, in order.
    prompt_frames: leading frames of ``segments[0]`` that belong to the continuation prompt; decode the
        segment whole (codec context) and drop the first ``prompt_frames * samples_per_frame`` samples.
    finished: True when the sample emitted its end token before ``max_new_tokens``.
    prompt_rows: leading ``rows`` that came from the prompt; ``processor.decode_text(rows[:, 0],
        prompt_rows)`` gives the generated text channel (audio blocks as ``<|audio|>``).
    """

    rows: torch.Tensor
    segments: list[torch.Tensor]
    prompt_frames: int
    finished: bool
    prompt_rows: int = 0


def last_index(values: torch.Tensor, token: int) -> torch.Tensor:
    """values: [B, L] -> [B] index of the last ``token`` per row, -1 when absent."""
    hits = values == token
    positions = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(hits, positions, -1).max(dim=1).values


@torch.inference_mode()
def generate_delay(
    model: MossTTSDelayModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    params: SamplingParams | None = None,
    max_new_tokens: int = 2000,
    generator: torch.Generator | None = None,
    upstream_compatible: bool = False,
    static_cache: bool = False,
    on_step: StepCallback | None = None,
) -> list[GeneratedSample]:
    """input_ids: [B, L, 1 + n_vq] left padded; attention_mask: [B, L] bool.

    ``static_cache`` preallocates the KV cache for ``L + max_new_tokens`` positions (no per-step
    copies; suits long runs on a GPU). ``on_step(step, rows)`` sees each new row batch [B, 1 + n_vq]
    and may return False to stop early (cancellation, streaming).

    ``max_new_tokens`` counts rows, including audio_start, the flush and the end rows.
    """
    params = params or SamplingParams()
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    device = model.device
    batch, prompt_len, width = input_ids.shape
    n_vq = width - 1
    if n_vq != cfg.n_vq:
        raise ConfigError(f"input_ids carry {n_vq} codebooks but the model has {cfg.n_vq}")
    if n_vq < 2 and not upstream_compatible:
        raise ConfigError("the corrected flush needs at least 2 codebooks; pass upstream_compatible=True")
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    text_prompt = input_ids[..., 0]
    rows_per_step = torch.arange(n_vq, device=device)

    # Per-sample state.
    last_text = text_prompt[:, -1]
    continuing = (last_text == cfg.audio_start_token_id) | (
        last_text == cfg.audio_assistant_gen_slot_token_id
    )
    last_start = last_index(text_prompt, cfg.audio_start_token_id)
    is_audio = continuing & (last_start >= 0)
    audio_len = torch.where(is_audio, prompt_len - last_start, 0)
    flush = torch.full((batch,), _NOT_FLUSHING, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    # Gen-slot rows (frames) made in this call: the end is forbidden below params.min_frames.
    made = torch.zeros(batch, dtype=torch.long, device=device)

    outside_audio_ban = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
    banned = [cfg.pad_token_id, cfg.audio_assistant_gen_slot_token_id]
    banned += [cfg.audio_assistant_delay_slot_token_id, cfg.audio_end_token_id]
    outside_audio_ban[banned] = True
    slots = torch.tensor(
        [cfg.audio_assistant_gen_slot_token_id, cfg.audio_assistant_delay_slot_token_id], device=device
    )

    codes_per_book = cfg.audio_vocab_size + 1
    seen = torch.zeros(batch, n_vq, codes_per_book, dtype=torch.bool, device=device)
    seen.scatter_(2, input_ids[..., 1:].transpose(1, 2), True)

    if static_cache:
        cache = model.new_cache(max_len=prompt_len + max_new_tokens)
        mask_buffer = torch.zeros(batch, prompt_len + max_new_tokens, dtype=torch.bool, device=device)
        mask_buffer[:, :prompt_len] = mask
    else:
        cache = model.new_cache()
    written = prompt_len
    step_input = input_ids
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if static_cache:
            positions = torch.arange(written - step_input.shape[1], written, device=device)[None]
            hidden = model(step_input, mask_buffer, cache=cache, position_ids=positions)[:, -1]
        else:
            hidden = model(step_input, mask, cache=cache)[:, -1]
        audio_logits = model.audio_logits(hidden)  # pad code already at -inf

        text = torch.full((batch,), cfg.pad_token_id, dtype=torch.long, device=device)
        active = ~stopped
        text[active & (flush < n_vq)] = cfg.audio_assistant_delay_slot_token_id
        ending = active & (flush == n_vq)
        text[ending] = cfg.audio_end_token_id
        is_audio = is_audio & ~ending
        free = active & (flush == _NOT_FLUSHING)
        in_audio = free & is_audio
        if bool(in_audio.any()):
            # Inside audio only the two slot tokens are allowed: score just those two head rows.
            slot_logits = hidden[in_audio] @ model.lm_heads[0].weight[slots].T
            if step == 0:
                slot_logits[:, 1] = float("-inf")
            early = made[in_audio] < params.min_frames
            slot_logits[:, 1] = slot_logits[:, 1].masked_fill(early, float("-inf"))
            picked = sample_tokens(
                slot_logits,
                temperature=params.text_temperature,
                top_k=params.text_top_k,
                top_p=params.text_top_p,
                generator=generator,
            )
            text[in_audio] = slots[picked]
        outside = free & ~is_audio
        if bool(outside.any()):
            text_logits = model.text_logits(hidden[outside]).masked_fill(outside_audio_ban, float("-inf"))
            if step == 0:
                text_logits[:, cfg.audio_assistant_delay_slot_token_id] = float("-inf")
            if step <= n_vq:
                text_logits[:, cfg.im_end_token_id] = float("-inf")
            early = made[outside] < params.min_frames
            text_logits[:, cfg.im_end_token_id] = text_logits[:, cfg.im_end_token_id].masked_fill(
                early, float("-inf")
            )
            text[outside] = sample_tokens(
                text_logits,
                temperature=params.text_temperature,
                top_k=params.text_top_k,
                top_p=params.text_top_p,
                generator=generator,
            )
        is_audio = is_audio | (text == cfg.audio_start_token_id)
        made += (text == cfg.audio_assistant_gen_slot_token_id).long()
        stopped = stopped | (text == cfg.im_end_token_id)

        new_flush = (flush == _NOT_FLUSHING) & (text == cfg.audio_assistant_delay_slot_token_id)
        if not upstream_compatible:
            flush = torch.where(new_flush, 1, flush)
        started = audio_len[:, None] > rows_per_step
        not_flushed = (flush == _NOT_FLUSHING)[:, None] | (rows_per_step >= flush[:, None])
        sample_mask = started & not_flushed  # [B, n_vq]
        codes = torch.full((batch, n_vq), cfg.audio_pad_code, dtype=torch.long, device=device)
        if bool(sample_mask.any()):
            codes[sample_mask] = _sample_audio(audio_logits, sample_mask, seen, params, generator)

        grows = (
            (text == cfg.audio_start_token_id)
            | (text == cfg.audio_assistant_gen_slot_token_id)
            | (text == cfg.audio_assistant_delay_slot_token_id)
        )
        audio_len = torch.where(text == cfg.audio_end_token_id, 0, audio_len + grows.long())
        if upstream_compatible:
            flush = torch.where(new_flush, 0, flush)
        flush = torch.where(flush != _NOT_FLUSHING, flush + 1, flush)
        flush = torch.where((flush > n_vq) & (flush != _NOT_FLUSHING), _NOT_FLUSHING, flush)

        row = torch.cat([text[:, None], codes], dim=1)
        seen.scatter_(2, codes[:, :, None], True)
        generated.append(row)
        step_input = row[:, None, :]
        if static_cache:
            mask_buffer[:, written] = ~stopped
        else:
            mask = torch.cat([mask, (~stopped)[:, None]], dim=1)
        written += 1
        if on_step is not None and on_step(step, row) is False:
            break
        if bool(stopped.all()):
            break

    all_rows = torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1).cpu()
    starts = (last_index(text_prompt, cfg.im_start_token_id) + 3).cpu()
    results = []
    for b in range(batch):
        start = int(starts[b])
        rows = all_rows[b, start:]
        prompt_rows = prompt_len - start
        results.append(
            GeneratedSample(
                rows=rows,
                segments=rows_to_segments(rows, pad_code=cfg.audio_pad_code, delayed=True),
                prompt_frames=max(prompt_rows - 1, 0),
                finished=bool(stopped[b]),
                prompt_rows=prompt_rows,
            )
        )
    return results


def _sample_audio(
    logits: torch.Tensor,
    sample_mask: torch.Tensor,
    seen: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits: [B, n, V]; sample_mask: [B, n]; seen: [B, n, V] -> codes for the masked entries (row-major)."""
    if params.audio_repetition_penalty == 1.0:
        seen_per_entry = None
    elif params.repetition_scope == "batch":
        # Upstream: codebook 0 against the batch's codebook-0 history, the rest against the union of
        # all other codebooks' histories across the batch.
        first = seen[:, 0].any(dim=0)
        rest = seen[:, 1:].any(dim=(0, 1))
        books = torch.stack([first] + [rest] * (seen.shape[1] - 1))
        seen_per_entry = books.expand_as(seen)
    else:
        seen_per_entry = seen
    chosen = logits[sample_mask]
    return sample_tokens(
        chosen,
        temperature=params.audio_temperature,
        top_k=params.audio_top_k,
        top_p=params.audio_top_p,
        penalty=params.audio_repetition_penalty,
        seen=None if seen_per_entry is None else seen_per_entry[sample_mask],
        generator=generator,
    )
