"""Every codec case of the upstream parity goldens (../shared/parity or $MOSS_PARITY_DIR), on the CPU in fp32.

Cases, inputs and outputs are read from manifest.json, so another fixture set with other seeds and
shapes runs unchanged. Chunked encode/decode goldens are replayed through ``encode_chunked`` /
``decode_chunked``, alone and as one row of a batch; streaming decode goldens through the multi-slot
state API, as slot 0 of one and of several streams.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moss_agent.models.codec import MossAudioTokenizer, load_codec
from tests.conftest import parity_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"encode", "encode_chunked", "batch_encode", "decode", "batch_decode", "decode_of_encode",
         "decode_chunked", "streaming_decode"}


class Goldens:
    def __init__(self, root: Path) -> None:
        self.folder = parity_model_dir(root, "codec")
        self.root = root
        self._files: dict[str, dict[str, torch.Tensor]] = {}
        manifest = json.loads((root / "manifest.json").read_text())
        self.cases = [case for case in manifest["cases"] if case["model"] == "codec"]
        info = manifest["models"]["codec"]
        self.atol = {"hidden": float(info["atol_encoder_hidden_states"]), "audio": float(info["atol_audio"])}
        self.contexts = info["contexts_tokens"]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        found = [case for case in self.cases if case["id"].split(".")[1] == kind]
        if not found:
            pytest.skip(f"this fixture set has no codec.{kind} case")
        return found

    def tolerance(self, case: dict[str, Any] | None, kind: str) -> float:
        """A case's own atol ("audio" or "hidden") when it gives one, else the model-wide one."""
        key = {"hidden": "encoder_hidden_states_atol", "audio": "audio_atol"}[kind]
        return float((case or {}).get("tolerance", {}).get(key, self.atol[kind]))

    def file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            self._files[name] = load_file(str(self.root / name))
        return self._files[name]

    def tensor(self, reference: str) -> torch.Tensor:
        """'codec/inputs.safetensors:wave.x  (notes)' -> that tensor."""
        name, key = reference.split()[0].split(":", 1)
        return self.file(name)[key]

    def chunks(self, reference: str) -> list[torch.Tensor]:
        """'codec/outputs.safetensors:<prefix>_000 ... <prefix>_011' -> the numbered tensors in order."""
        name, first = reference.split()[0].split(":", 1)
        prefix = first.rsplit("_", 1)[0] + "_"
        tensors = self.file(name)
        return [tensors[key] for key in sorted(k for k in tensors if k.startswith(prefix))]

    def close_audio(self, actual: torch.Tensor, expected: torch.Tensor, case: dict[str, Any], what: str = "") -> None:
        assert actual.shape == expected.shape, f"{case['id']} {what}"
        torch.testing.assert_close(actual, expected, atol=self.tolerance(case, "audio"), rtol=0,
                                   msg=f"{case['id']} {what}")

    def close_hidden(self, actual: torch.Tensor, expected: torch.Tensor, case: dict[str, Any]) -> None:
        assert actual.shape == expected.shape, case["id"]
        torch.testing.assert_close(actual, expected, atol=self.tolerance(case, "hidden"), rtol=0, msg=case["id"])


@pytest.fixture(scope="module")
def goldens(parity_dir: Path) -> Goldens:
    return Goldens(parity_dir)


@pytest.fixture(scope="module")
def codec(goldens: Goldens) -> MossAudioTokenizer:
    return load_codec(goldens.folder / "checkpoint", device="cpu", dtype=torch.float32)


def _chunk_duration(case: dict[str, Any]) -> float:
    """The case's chunk_duration: an input where the manifest lists it, else the call in its ``pins``."""
    duration = case["inputs"].get("chunk_duration")
    if duration is None:
        found = re.search(r"chunk_duration=([0-9.]+)", case["pins"])
        assert found, f"{case['id']} names no chunk_duration"
        duration = found.group(1)
    return float(duration)


def test_every_codec_case_kind_is_known(goldens: Goldens) -> None:
    kinds = {case["id"].split(".")[1] for case in goldens.cases}
    assert kinds and kinds <= KINDS, f"codec cases of unknown kinds: {sorted(kinds - KINDS)}"


def test_sizes_come_from_the_config(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    config = json.loads((goldens.folder / "checkpoint" / "config.json").read_text())
    assert codec.sample_rate == config["sampling_rate"] and codec.frame_size == config["downsample_rate"]
    assert codec.num_quantizers == config["quantizer_kwargs"]["num_quantizers"]
    assert codec.codebook_size == config["quantizer_kwargs"]["codebook_size"]
    assert [stage.capacity for stage in codec._transformers(codec.encoder)] == goldens.contexts["encoder"]
    assert [stage.capacity for stage in codec._transformers(codec.decoder)] == goldens.contexts["decoder"]


def test_encode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("encode"):
        samples, outputs = goldens.tensor(case["inputs"]["input_values"]).reshape(1, 1, -1), case["outputs"]
        assert samples.shape[-1] == case["inputs"].get("num_samples", samples.shape[-1]), case["id"]
        codes, lengths = codec.encode(samples)
        assert torch.equal(codes, goldens.tensor(outputs["audio_codes"])), case["id"]
        assert torch.equal(lengths, goldens.tensor(outputs["audio_codes_lengths"])), case["id"]
        facts = case.get("facts", {})
        assert codes.shape[-1] == facts.get("ceil_frames", codes.shape[-1])
        assert int(lengths[0]) == facts.get("floor_length", int(lengths[0]))
        latents, frame_lengths = codec.encode_latents(samples[:, 0])  # the [B, T] input form
        goldens.close_hidden(latents, goldens.tensor(outputs["encoder_hidden_states"]), case)
        assert torch.equal(frame_lengths, lengths)
        count = case["inputs"]["num_quantizers_prefix"]
        prefix, _ = codec.encode(samples, num_quantizers=count)
        assert torch.equal(prefix, goldens.tensor(outputs["prefix_audio_codes"])), case["id"]
        assert torch.equal(prefix, codes[:count])


def _padded(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.shape[-1] for w in waves])
    batch = torch.zeros(len(waves), 1, int(lengths.max()))
    for row, wave in enumerate(waves):
        batch[row, 0, : wave.shape[-1]] = wave
    return batch, lengths


def test_batch_encode_pads_and_keeps_floor_lengths(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("batch_encode"):
        batch, lengths = _padded([goldens.tensor(ref) for ref in case["inputs"]["wav_list"]])
        codes, code_lengths = codec.encode(batch, lengths=lengths)
        assert torch.equal(codes, goldens.tensor(case["outputs"]["audio_codes"]))
        assert torch.equal(code_lengths, goldens.tensor(case["outputs"]["audio_codes_lengths"]))
        latents, _ = codec.encode_latents(batch, lengths)
        goldens.close_hidden(latents, goldens.tensor(case["outputs"]["encoder_hidden_states"]), case)


def test_decode_and_prefix_decode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("decode"):
        codes, outputs = goldens.tensor(case["inputs"]["audio_codes"]), case["outputs"]
        wav, lengths = codec.decode(codes)
        goldens.close_audio(wav, goldens.tensor(outputs["audio"]), case)
        assert torch.equal(lengths, goldens.tensor(outputs["audio_lengths"]))
        prefix, _ = codec.decode(codes[: case["inputs"]["num_quantizers_prefix"]])
        goldens.close_audio(prefix, goldens.tensor(outputs["prefix_audio"]), case, "prefix")


def test_batch_decode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("batch_decode"):
        items = [goldens.tensor(ref) for ref in case["inputs"]["codes_list"]]
        items = [item[:, 0] if item.dim() == 3 else item for item in items]  # [nq, 1, T] -> [nq, T]
        codes = torch.zeros(items[0].shape[0], len(items), max(i.shape[-1] for i in items), dtype=torch.long)
        for row, item in enumerate(items):
            codes[:, row, : item.shape[-1]] = item
        wav, lengths = codec.decode(codes, lengths=[item.shape[-1] for item in items])
        goldens.close_audio(wav, goldens.tensor(case["outputs"]["audio"]), case)
        assert torch.equal(lengths, goldens.tensor(case["outputs"]["audio_lengths"]))


def test_decode_of_encode(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    for case in goldens.of_kind("decode_of_encode"):
        wav, _ = codec.decode(goldens.tensor(case["inputs"]["audio_codes"]))
        goldens.close_audio(wav, goldens.tensor(case["outputs"]["audio"]), case)


def _stream_decode(codec: MossAudioTokenizer, codes: torch.Tensor, frames: int, slots: int = 1) -> list[torch.Tensor]:
    """Feed codes [nq, 1, N] to slot 0 of a ``slots``-wide state, ``frames`` per step; other slots get noise."""
    state = codec.init_decode_state(slots)
    generator = torch.Generator().manual_seed(7)
    chunks = []
    for start in range(0, codes.shape[-1], frames):
        piece = codes[:, :, start : start + frames]
        if slots > 1:
            others = torch.randint(0, codec.codebook_size, (piece.shape[0], slots - 1, piece.shape[-1]),
                                   generator=generator)
            piece = torch.cat([piece, others], dim=1)
        chunks.append(codec.decode_step(piece, state)[:1])
    return chunks


@pytest.mark.parametrize("slots", [1, 4])
def test_streaming_decode(codec: MossAudioTokenizer, goldens: Goldens, slots: int) -> None:
    for case in goldens.of_kind("streaming_decode"):
        expected = goldens.chunks(case["outputs"]["chunks"])
        codes = goldens.tensor(case["inputs"]["audio_codes"])
        chunks = _stream_decode(codec, codes, case["inputs"]["frames_per_call"], slots)
        assert len(chunks) == len(expected) == case.get("facts", {}).get("num_calls", len(expected))
        for index, (chunk, golden) in enumerate(zip(chunks, expected, strict=True)):
            goldens.close_audio(chunk, golden, case, f"call {index}")


def test_streaming_departs_from_offline_where_upstream_does(codec: MossAudioTokenizer, goldens: Goldens) -> None:
    """Upstream semantics, not noise: streaming agrees with offline decode until a stage window fills."""
    for case in goldens.of_kind("streaming_decode"):
        first = case.get("facts", {}).get("first_frame_differing_from_offline_decode")
        if first is None:
            continue
        codes = goldens.tensor(case["inputs"]["audio_codes"])
        offline, _ = codec.decode(codes)
        streamed = torch.cat(_stream_decode(codec, codes, case["inputs"]["frames_per_call"]), dim=-1)
        gaps = (streamed - offline).abs().reshape(codes.shape[-1], -1).amax(-1)
        if first > 0:
            assert float(gaps[:first].max()) <= goldens.tolerance(case, "audio"), case["id"]
        assert float(gaps[first:].max()) > goldens.tolerance(case, "audio"), case["id"]


def _other_rows(codec: MossAudioTokenizer, rows: int, span: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``rows`` noise waveforms [rows, 1, span] with lengths from a tenth of ``span`` to all of it."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(span // 10, span + 1, (rows,), generator=generator).tolist()
    return 0.3 * torch.randn(rows, 1, span, generator=generator), lengths


@pytest.mark.parametrize("rows", [1, 3])
def test_chunked_decode(codec: MossAudioTokenizer, goldens: Goldens, rows: int) -> None:
    """decode(codes, chunk_duration=...) -> decode_chunked, alone and as row 0 of a ragged batch."""
    for case in goldens.of_kind("decode_chunked"):
        codes = goldens.tensor(case["inputs"]["audio_codes"])
        nq, _, frames = codes.shape
        generator = torch.Generator().manual_seed(rows)
        others = torch.randint(0, codec.codebook_size, (nq, rows - 1, frames), generator=generator)
        batch = torch.cat([codes, others], dim=1)
        lengths = [frames, *torch.randint(1, frames + 1, (rows - 1,), generator=generator).tolist()]
        wav, wav_lengths = codec.decode_chunked(batch, lengths, chunk_duration=_chunk_duration(case))
        expected = goldens.tensor(case["outputs"]["audio"])
        goldens.close_audio(wav[:1], expected, case)
        assert wav_lengths.tolist() == [n * codec.frame_size for n in lengths]


@pytest.mark.parametrize("rows", [1, 3])
def test_chunked_encode(codec: MossAudioTokenizer, goldens: Goldens, rows: int) -> None:
    """encode(wav, chunk_duration=...) -> encode_chunked: codes, lengths and latents in one pass."""
    for case in goldens.of_kind("encode_chunked"):
        samples = goldens.tensor(case["inputs"]["input_values"])
        others, other_lengths = _other_rows(codec, rows - 1, samples.numel(), seed=rows)
        batch = torch.cat([samples.reshape(1, 1, -1), others])
        codes, code_lengths, latents = codec.encode_chunked(
            batch, [samples.numel(), *other_lengths], chunk_duration=_chunk_duration(case)
        )
        expected = goldens.tensor(case["outputs"]["audio_codes"])
        width = expected.shape[-1]
        assert torch.equal(codes[:, :1, :width], expected), case["id"]
        assert not codes[:, :1, width:].any(), "frames past the row's count must be 0"
        assert torch.equal(code_lengths[:1], goldens.tensor(case["outputs"]["audio_codes_lengths"])), case["id"]
        assert width == case.get("facts", {}).get("frames", width)
        goldens.close_hidden(latents[:1, :, :width], goldens.tensor(case["outputs"]["encoder_hidden_states"]), case)
