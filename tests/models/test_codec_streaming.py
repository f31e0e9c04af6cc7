"""Multi-stream codec streaming on tiny random codecs: slots are independent, resets are clean, the
ring caches wrap as upstream's do, and streaming equals offline while every window still holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moss_agent.errors import ConfigError
from moss_agent.models.codec import MossAudioTokenizer, SampleFramer, load_codec
from moss_agent.models.codec.tiny import save_tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 20  # 1.6 s: five times the 0.32 s window of the default tiny codec, so every ring wraps


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioTokenizer:
    return load_codec(save_tiny_codec(tmp_path_factory.mktemp("codec"), seed=3), device="cpu")


@pytest.fixture(scope="module")
def wide_codec(tmp_path_factory: pytest.TempPathFactory) -> MossAudioTokenizer:
    """A 2 s window: a 1.6 s stream never fills it, so streaming must equal offline."""
    folder = save_tiny_codec(tmp_path_factory.mktemp("wide"), seed=4, context_duration=2.0)
    return load_codec(folder, device="cpu")


def _codes(codec: MossAudioTokenizer, batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.codebook_size, (codec.num_quantizers, batch, frames), generator=generator)


def _noise(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, 1, frames * 1920, generator=generator)


def _decode_stream(codec: MossAudioTokenizer, codes: torch.Tensor, per_step: int) -> torch.Tensor:
    state = codec.init_decode_state(codes.shape[1])
    pieces = [codec.decode_step(codes[:, :, t : t + per_step], state) for t in range(0, codes.shape[-1], per_step)]
    return torch.cat(pieces, dim=-1)


def _state_rows(state: object, slot: int) -> list[torch.Tensor]:
    rows = [state.frames[slot].clone()]  # type: ignore[attr-defined]
    for stage in state.stages:  # type: ignore[attr-defined]
        rows += [stage.keys[:, slot].clone(), stage.values[:, slot].clone()]
    return rows


@pytest.mark.parametrize("per_step", [1, 3])
def test_multi_slot_streaming_matches_one_stream_at_a_time(codec: MossAudioTokenizer, per_step: int) -> None:
    codes = _codes(codec, 3)
    together = _decode_stream(codec, codes, per_step)
    assert together.shape == (3, 1, FRAMES * codec.frame_size)
    for slot in range(3):
        alone = _decode_stream(codec, codes[:, slot : slot + 1], per_step)
        # Batch shape changes BLAS blocking (~1e-6), as between upstream batch and single decodes.
        torch.testing.assert_close(together[slot : slot + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_step", [1, 3])
def test_streaming_equals_offline_while_the_window_holds(wide_codec: MossAudioTokenizer, per_step: int) -> None:
    codes = _codes(wide_codec, 2)
    offline, _ = wide_codec.decode(codes)
    torch.testing.assert_close(_decode_stream(wide_codec, codes, per_step), offline, atol=2e-5, rtol=0)
    wav = _noise(2, FRAMES)
    latents, _ = wide_codec.encode_latents(wav)
    state = wide_codec.init_encode_state(2)
    step = per_step * wide_codec.frame_size
    streamed = torch.cat([wide_codec.encode_latents_step(wav[..., s : s + step], state)
                          for s in range(0, wav.shape[-1], step)], dim=-1)
    torch.testing.assert_close(streamed, latents, atol=2e-5, rtol=0)


def test_streaming_past_the_window_departs_from_offline(codec: MossAudioTokenizer) -> None:
    """Ring caches of capacity = window lose the oldest keys of a chunk once full (upstream behaviour)."""
    codes = _codes(codec, 1)
    offline, _ = codec.decode(codes)
    streamed = _decode_stream(codec, codes, 3)
    gap = (streamed - offline).abs().reshape(FRAMES, -1).amax(-1)
    assert float(gap[:3].max()) < 1e-5  # the first chunk fits every window
    assert float(gap[4:].max()) > 1e-3


def test_feeding_resetting_or_pausing_slot_1_leaves_slots_0_and_2_bit_identical(codec: MossAudioTokenizer) -> None:
    codes = _codes(codec, 3, seed=1)
    other = _codes(codec, 3, seed=2)

    def run(disturb: bool) -> torch.Tensor:
        state = codec.init_decode_state(3)
        outputs = []
        for t in range(FRAMES):
            step_codes = codes[:, :, t : t + 1].clone()
            active = torch.tensor([True, False, True])
            if disturb:
                step_codes[:, 1] = other[:, 1, t : t + 1]
                active[1] = t % 4 != 2
                if t == 9:
                    state.reset(1)
            outputs.append(codec.decode_step(step_codes, state, active))
        return torch.cat(outputs, dim=-1)

    quiet, busy = run(disturb=False), run(disturb=True)
    assert torch.equal(quiet[0], busy[0]) and torch.equal(quiet[2], busy[2])
    assert not torch.equal(quiet[1], busy[1])
    assert torch.count_nonzero(quiet[1]) == 0  # an inactive slot yields silence


def test_inactive_slot_state_is_untouched(codec: MossAudioTokenizer) -> None:
    state = codec.init_decode_state(3)
    codec.decode_step(_codes(codec, 3, frames=4), state)
    before = _state_rows(state, 1)
    pointers = [stage.keys.data_ptr() for stage in state.stages]
    codec.decode_step(_codes(codec, 3, frames=2, seed=9), state, torch.tensor([True, False, True]))
    assert all(torch.equal(a, b) for a, b in zip(before, _state_rows(state, 1), strict=True))
    assert state.frames.tolist() == [6, 4, 6]
    padded = _codes(codec, 3, frames=1)
    padded[:, 0] = codec.codebook_size  # a padding id in an idle slot is ignored
    codec.decode_step(padded, state, [False, True, False])  # a plain list works too
    assert state.frames.tolist() == [6, 5, 6]
    assert [stage.keys.data_ptr() for stage in state.stages] == pointers  # updated in place


@pytest.mark.parametrize("slots", [1, [1], torch.tensor([False, True, False])])
def test_reset_mid_stream_equals_a_fresh_stream(codec: MossAudioTokenizer, slots: object) -> None:
    history, fresh_codes = _codes(codec, 3, frames=9, seed=5), _codes(codec, 3, frames=8, seed=6)
    state = codec.init_decode_state(3)
    for t in range(0, 9, 3):
        codec.decode_step(history[:, :, t : t + 3], state)
    state.reset(slots)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(_state_rows(state, 1), _state_rows(codec.init_decode_state(3), 1),
                                                    strict=True))
    fresh = codec.init_decode_state(3)
    for t in range(0, 8, 2):
        piece = fresh_codes[:, :, t : t + 2]
        assert torch.equal(codec.decode_step(piece, state)[1], codec.decode_step(piece, fresh)[1])


def test_multi_slot_encode_matches_one_stream_at_a_time(codec: MossAudioTokenizer) -> None:
    wav = _noise(3, 12, seed=3)
    state = codec.init_encode_state(3)
    together = torch.cat([codec.encode_step(wav[..., s : s + 3840], state) for s in range(0, wav.shape[-1], 3840)],
                         dim=-1)
    assert together.shape == (codec.num_quantizers, 3, 12)
    for slot in range(3):
        alone_state = codec.init_encode_state(1)
        alone = torch.cat([codec.encode_step(wav[slot : slot + 1, :, s : s + 3840], alone_state)
                           for s in range(0, wav.shape[-1], 3840)], dim=-1)
        assert (alone == together[:, slot : slot + 1]).float().mean() > 0.95  # ties aside, same codes
    prefix_state = codec.init_encode_state(3)
    prefix = codec.encode_step(wav[..., :3840], prefix_state, num_quantizers=2)
    assert torch.equal(prefix, together[:2, :, :2])


def test_sample_framer_feeds_whole_frames_from_20ms_pieces(codec: MossAudioTokenizer) -> None:
    wav = _noise(2, 6, seed=8)
    reference_state = codec.init_encode_state(2)
    reference = torch.cat([codec.encode_step(wav[..., s : s + 1920], reference_state)
                           for s in range(0, wav.shape[-1], 1920)], dim=-1)

    framer = SampleFramer(2, codec.frame_size)
    state = codec.init_encode_state(2)
    codes: list[list[torch.Tensor]] = [[], []]
    piece = 480  # 20 ms at 24 kHz
    lag = 3 * piece  # stream 1 runs behind stream 0, so the framer's active mask differs per slot
    for start in range(0, wav.shape[-1] + lag, piece):
        if start < wav.shape[-1]:
            framer.push(0, wav[0, 0, start : start + piece])
        if 0 <= start - lag < wav.shape[-1]:
            framer.push(1, wav[1, 0, start - lag : start - lag + piece].numpy())
        while any(framer.frames_ready()):
            frame, active = framer.pop()
            step = codec.encode_step(frame, state, active)
            for slot in range(2):
                if active[slot]:
                    codes[slot].append(step[:, slot])
    for slot in range(2):
        assert torch.equal(torch.cat(codes[slot], dim=-1), reference[:, slot])


def test_sample_framer_pads_only_on_flush() -> None:
    framer = SampleFramer(2, 1920)
    framer.push(0, np.ones(2500, dtype=np.float32))
    assert framer.frames_ready() == [1, 0]
    frame, active = framer.pop()
    assert active.tolist() == [True, False] and torch.equal(frame[0, 0], torch.ones(1920))
    assert framer.frames_ready() == [0, 0]
    framer.flush(0)
    frame, active = framer.pop()
    assert active.tolist() == [True, False]
    assert torch.equal(frame[0, 0, :580], torch.ones(580)) and torch.count_nonzero(frame[0, 0, 580:]) == 0
    framer.flush(1)  # nothing buffered: nothing to pad
    assert framer.frames_ready() == [0, 0]
    with pytest.raises(ConfigError):
        framer.push(2, np.zeros(10))
    with pytest.raises(ConfigError):
        framer.push(0, np.zeros((2, 10)))


def test_step_input_errors(codec: MossAudioTokenizer, wide_codec: MossAudioTokenizer) -> None:
    decode_state, encode_state = codec.init_decode_state(2), codec.init_encode_state(2)
    wide_state = wide_codec.init_decode_state(2)
    with pytest.raises(ConfigError, match="frames per step"):
        codec.decode_step(_codes(codec, 2, frames=5), decode_state)  # the 0.32 s window holds 4 frames
    with pytest.raises(ConfigError, match="init_decode_state"):
        codec.decode_step(_codes(codec, 2, frames=1), encode_state)
    with pytest.raises(ConfigError, match="2 slots"):
        codec.decode_step(_codes(codec, 3, frames=1), decode_state)
    with pytest.raises(ConfigError, match="whole frames"):
        codec.encode_step(torch.zeros(2, 1, 1000), encode_state)
    with pytest.raises(ConfigError, match="out of range"):
        decode_state.reset(5)
    with pytest.raises(ConfigError, match="bool mask"):
        codec.decode_step(_codes(codec, 2, frames=1), decode_state, torch.tensor([True, False, True]))
    with pytest.raises(ConfigError, match="another architecture"):
        codec.decode_step(_codes(codec, 2, frames=1), wide_state)
    assert decode_state.frames.tolist() == [0, 0]  # nothing was consumed by the failed calls


def test_streaming_in_half_precision(codec: MossAudioTokenizer, tmp_path: Path) -> None:
    folder = save_tiny_codec(tmp_path, seed=3)
    codes = _codes(codec, 2, frames=6)
    reference = _decode_stream(codec, codes, 2)
    for dtype in (torch.bfloat16, torch.float16):
        half = load_codec(folder, device="cpu", dtype=dtype)
        state = half.init_decode_state(2)
        assert state.stages[0].keys.dtype == dtype
        out = torch.cat([half.decode_step(codes[:, :, t : t + 2], state) for t in range(0, 6, 2)], dim=-1)
        assert out.dtype == torch.float32
        assert float((out - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_decode_step_traces_as_one_graph(codec: MossAudioTokenizer) -> None:
    """No .item() or value-dependent Python branch in the step: it compiles with fullgraph=True."""
    codes = _codes(codec, 3, frames=6, seed=4)
    active = torch.tensor([True, False, True])
    codec.decode_step(codes[:, :, :1], codec.init_decode_state(3))  # eager warm-up builds the code tables
    compiled = torch.compile(codec.decode_step, backend="eager", fullgraph=True)
    eager_state, compiled_state = codec.init_decode_state(3), codec.init_decode_state(3)
    for t in range(0, 6, 2):
        piece = codes[:, :, t : t + 2]
        assert torch.equal(compiled(piece, compiled_state, active), codec.decode_step(piece, eager_state, active))
    assert torch.equal(compiled_state.frames, eager_state.frames)


def test_long_offline_attention_in_query_blocks_equals_one_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from moss_agent.models.codec import transformer

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=generator) for _ in range(3))
    whole = transformer.windowed_attention(q, k, v, context=7)
    monkeypatch.setattr(transformer, "_FULL_MASK_MAX_TOKENS", 10)
    torch.testing.assert_close(transformer.windowed_attention(q, k, v, context=7), whole, atol=1e-6, rtol=0)
    # Query 30 sees keys 24..30 only.
    expected = torch.softmax(q[:, :, 30:31] @ k[:, :, 24:31].transpose(-1, -2) / 8**0.5, dim=-1) @ v[:, :, 24:31]
    torch.testing.assert_close(whole[:, :, 30:31], expected, atol=1e-6, rtol=0)


def test_decode_step_traces_whole_and_matches_eager(codec: MossAudioTokenizer) -> None:
    """The engine compiles ``decode_step`` with ``compile=True``: it must trace as one graph (no
    breaks, fullgraph) and give the eager audio, slots pausing included. The eager backend only
    traces, so this stays fast; the generated C++ is exercised by the realtime tick's test."""
    from moss_agent.models.compiling import compile_step

    codes = _codes(codec, 3, frames=6)
    traced = compile_step(codec.decode_step, "eager")
    outputs = []
    for step in (codec.decode_step, traced):
        state = codec.init_decode_state(3)
        waves = []
        for frame in range(6):
            active = torch.tensor([True, frame % 2 == 0, frame != 3])
            waves.append(step(codes[:, :, frame : frame + 1], state, active))
        outputs.append(torch.cat(waves, dim=-1))
    assert outputs[0].abs().max() > 0
    assert torch.equal(outputs[0], outputs[1])
