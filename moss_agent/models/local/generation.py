"""Batched generation for MossTTSLocal v1: one backbone step per frame, then the local transformer
walks the frame's channels (text token, codebook 0, 1, ...), each fed back as the next input.

Follows upstream ``CustomMixin._sample`` (OpenMOSS/MOSS-TTS ``moss_tts_local``), with a KV cache in
the local transformer instead of re-running the prefix for every channel (same result: it is causal
and has no positions). Documented departures unless ``upstream_compatible=True``:
- the text channel may only be ``gen_slot`` or ``audio_end`` (upstream samples the full vocabulary,
  so a random-weight or unlucky model can emit stray text that is then fed back);
- the codes sampled on the ``audio_end`` row are dropped (training labels there are padding);
- codebooks beyond ``n_vq_for_inference`` are the pad code, and segments keep only the used
  codebooks (upstream writes code 0 there and hands all of them to the codec);
- the returned rows start at the prompt's last ``<|audio_start|>`` (upstream searches the final ids,
  so a generated audio_start would move it);
- a repetition penalty also acts under greedy audio decoding (upstream builds no logits processors
  for a greedy channel, so its penalty only acts while sampling).
"""

from __future__ import annotations

import torch

from moss_agent.errors import ConfigError
from moss_agent.models.batch_sampling import SamplingParams, preset, sample_tokens
from moss_agent.models.delay.generation import GeneratedSample, StepCallback, last_index
from moss_agent.models.delay.pattern import split_segments
from moss_agent.models.local.model import MossTTSLocalModel


@torch.inference_mode()
def generate_local(
    model: MossTTSLocalModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    params: SamplingParams | None = None,
    max_new_tokens: int = 2000,
    n_vq_for_inference: int | None = None,
    generator: torch.Generator | None = None,
    upstream_compatible: bool = False,
    on_step: StepCallback | None = None,
) -> list[GeneratedSample]:
    """input_ids: [B, L, 1 + n_vq] left padded (generation prompts end on an audio_start row);
    attention_mask: [B, L] bool. ``max_new_tokens`` counts frames (rows). ``on_step(step, rows)``
    sees each new row batch [B, 1 + n_vq] and may return False to stop early."""
    params = params or preset("moss-tts-local")
    cfg = model.config
    n_vq = cfg.n_vq
    used = n_vq if n_vq_for_inference is None else int(n_vq_for_inference)
    if not 1 <= used <= n_vq:
        raise ConfigError(f"n_vq_for_inference must be in [1, {n_vq}], got {n_vq_for_inference}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt_len, width = input_ids.shape
    if width != 1 + n_vq:
        raise ConfigError(f"input_ids carry {width - 1} codebooks but the model has {n_vq}")
    device = model.device
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    text_prompt = input_ids[..., 0]
    prompt_start = last_index(text_prompt, cfg.audio_start_token_id)

    codes_per_book = cfg.audio_vocab_size + 1
    seen = torch.zeros(batch, n_vq, codes_per_book, dtype=torch.bool, device=device)
    seen.scatter_(2, input_ids[..., 1:].transpose(1, 2), True)
    text_allowed = None
    if not upstream_compatible:
        text_allowed = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
        text_allowed[[cfg.audio_assistant_gen_slot_token_id, cfg.audio_end_token_id]] = True

    penalize = params.audio_repetition_penalty != 1.0
    if upstream_compatible and params.audio_temperature <= 0:
        penalize = False
    cache = model.new_cache()
    step_input = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -step_input.shape[1] :]
        hidden = model(step_input, mask, cache=cache, position_ids=positions, n_vq=used)[:, -1]
        # Frame ``step`` may not end the audio below params.min_frames.
        may_end = step >= params.min_frames
        row = _sample_frame(model, hidden, used, seen, params, text_allowed, generator, penalize, may_end)
        just_ended = row[:, 0] == cfg.audio_end_token_id
        if upstream_compatible:
            row[:, 1 + used :] = 0
        else:
            row[just_ended, 1:] = cfg.audio_pad_code
        row[finished, 0] = cfg.audio_end_token_id
        row[finished, 1:] = cfg.audio_pad_code
        finished = finished | just_ended
        seen.scatter_(2, row[:, 1:, None], True)
        generated.append(row)
        step_input = row[:, None, :]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        if on_step is not None and on_step(step, row) is False:
            break
        if bool(finished.all()):
            break

    all_rows = torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1).cpu()
    if upstream_compatible:
        starts = last_index(all_rows[..., 0], cfg.audio_start_token_id)
    else:
        starts = prompt_start.cpu()
    results = []
    for b in range(batch):
        start = int(starts[b])
        rows = all_rows[b, start:] if start >= 0 else all_rows[b, prompt_len:]
        audio = rows[:, 1:] if upstream_compatible else rows[:, 1 : 1 + used]
        results.append(
            GeneratedSample(
                rows=rows,
                segments=split_segments(audio, cfg.audio_pad_code),
                prompt_frames=max(prompt_len - start - 1, 0) if start >= 0 else 0,
                finished=bool(finished[b]),
                prompt_rows=prompt_len - start if start >= 0 else 0,
            )
        )
    return results


def _sample_frame(
    model: MossTTSLocalModel,
    hidden: torch.Tensor,
    used: int,
    seen: torch.Tensor,
    params: SamplingParams,
    text_allowed: torch.Tensor | None,
    generator: torch.Generator | None,
    penalize: bool,
    may_end: bool = True,
) -> torch.Tensor:
    """hidden: [B, H] backbone state -> one row [B, 1 + n_vq] (text token, codes); ``penalize``
    applies the audio repetition penalty against ``seen``; ``may_end`` False forbids ``<|audio_end|>``."""
    cfg = model.config
    batch = hidden.shape[0]
    row = torch.full((batch, 1 + cfg.n_vq), cfg.audio_pad_code, dtype=torch.long, device=hidden.device)
    if params.repetition_scope == "batch":
        seen = seen.any(dim=0, keepdim=True).expand_as(seen)
    local_cache = model.local_transformer.new_cache()
    step_in = model.local_input(hidden)
    for channel in range(1 + used):
        out = model.local_transformer(step_in[:, None, :], cache=local_cache)[:, -1]
        logits = model.channel_logits(channel, out)
        if channel == 0:
            if text_allowed is not None:
                logits = logits.masked_fill(~text_allowed, float("-inf"))
            if not may_end:
                logits[:, cfg.audio_end_token_id] = float("-inf")
            token = sample_tokens(
                logits,
                temperature=params.text_temperature,
                top_k=params.text_top_k,
                top_p=params.text_top_p,
                generator=generator,
            )
        else:
            logits[:, cfg.audio_pad_code] = float("-inf")
            token = sample_tokens(
                logits,
                temperature=params.audio_temperature,
                top_k=params.audio_top_k,
                top_p=params.audio_top_p,
                penalty=params.audio_repetition_penalty,
                seen=seen[:, channel - 1] if penalize else None,
                generator=generator,
            )
        row[:, channel] = token
        if channel < used:
            step_in = model.local_input(model.model.embedding_list[channel](token))
    return row
