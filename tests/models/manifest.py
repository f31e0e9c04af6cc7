"""Reading the parity manifest: case ids and kinds, tensor references, layouts and stated settings.

Every parity test takes its settings from the fixture set (``manifest.json`` / ``<model>/cases.json``)
rather than from constants that happen to match the visible set, so another set of the same format
(other seeds, shapes, texts, settings and case ids) runs unchanged. Where the manifest leaves a value
unstated, the helper that reads it names the default it assumes and why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch

from moss_agent.models.batch_sampling import SamplingParams
from tests.conftest import _parity_root

# Words a shape note uses for the time axis ("[T, n_vq]", "[frames, codebooks]", "given as [32,T]").
_TIME_WORDS = {"t", "t_i", "l", "n", "frames", "frame", "time", "n_frames", "num_frames", "steps"}
_CODEBOOK_WORDS = {"n_vq", "nq", "vq", "rvq", "codebooks", "codebook", "n_codebooks", "num_quantizers", "c"}


@cache
def _read_manifest(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_manifest(parity_dir: Path) -> dict:
    return _read_manifest(str(parity_dir / "manifest.json"))


def model_cases(parity_dir: Path, model: str) -> dict[str, dict]:
    """Case id -> case for one model, by the case's ``model`` field (ids may be renamed)."""
    return {c["id"]: c for c in load_manifest(parity_dir)["cases"] if c["model"] == model}


def model_info(parity_dir: Path, model: str) -> dict:
    """The manifest's ``models`` entry (checkpoint facts, tolerances, driver settings)."""
    return load_manifest(parity_dir)["models"].get(model, {})


def case_kind(case: dict) -> str:
    """What a language-model case pins, read from its content (ids may carry any suffix):
    ``proc`` (a processor call), ``stream`` (a realtime streaming session), ``generate`` (a
    generate call), ``teacher_forced`` (a forward pass), else ``unknown``."""
    inputs, pins = case.get("inputs", {}), case.get("pins", "")
    if "call" in inputs:
        return "proc"
    if "text_token_ids" in inputs or "text_deltas" in inputs:
        return "stream"
    if re.search(r"\.generate\b", pins):
        return "generate"
    if re.search(r"\.forward\(", pins):
        return "teacher_forced"
    return "unknown"


def manifest_ids(model: str, kind: str | None = None, where: Callable[[dict], bool] | None = None) -> list[str]:
    """Case ids of ``model`` (and ``kind``, and cases ``where`` accepts), read at collection so another
    fixture set runs unchanged. With no parity folder one placeholder id stands in; the parity_dir
    fixture then skips it."""
    root = _parity_root()
    if root is None or not (root / "manifest.json").is_file():
        return [f"{model}.<no parity goldens>"]
    cases = model_cases(root, model).values()
    return [c["id"] for c in cases if (kind is None or case_kind(c) == kind) and (where is None or where(c))]


def require(case_id: str, cases: dict[str, dict]) -> dict:
    if case_id not in cases:
        pytest.skip(f"{case_id} is not in this fixture set")
    return cases[case_id]


def golden_key(reference: str) -> str:
    """'delay/goldens.safetensors:some.key  [shape note]' -> 'some.key'."""
    return reference.split(":", 1)[1].split()[0]


def json_field(reference: str) -> tuple[str, str]:
    """ "delay/cases.json:generation['some.id']  (note)" -> ('generation', 'some.id')."""
    match = re.search(r"cases\.json:(\w+)\[['\"]([^'\"]+)['\"]\]", reference)
    assert match, f"cannot read a cases.json field from {reference!r}"
    return match.group(1), match.group(2)


def compare_gathered(actual: torch.Tensor, goldens: dict[str, torch.Tensor], base: str, atol: float) -> int:
    """Compare ``actual`` (full logits [..., V]) with every partial golden stored under ``base``:
    each ``<base>_<name>`` whose ``<base>_<name>_idx`` exists (top-k values, fixed samples) and
    ``<base>_logsumexp``. Returns how many goldens were compared (callers assert it is not 0)."""
    compared = 0
    for key in sorted(goldens):
        if key.startswith(base + "_") and not key.endswith("_idx") and key + "_idx" in goldens:
            index = goldens[key + "_idx"]
            torch.testing.assert_close(
                actual.gather(-1, index), goldens[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
            )
            compared += 1
    if base + "_logsumexp" in goldens:
        expected = goldens[base + "_logsumexp"]
        torch.testing.assert_close(actual.logsumexp(-1).reshape(expected.shape), expected, atol=atol, rtol=0)
        compared += 1
    return compared


def shape_note(reference: str) -> list[str] | None:
    """The first bracketed shape in a reference's note, as lower-case words: '[T, n_vq]' -> ['t', 'n_vq']."""
    note = reference.split(":", 1)[1] if ":" in reference else reference
    match = re.search(r"\[([^\]\[]+)\]", note)
    if match is None:
        return None
    return [word.strip().lower() for word in match.group(1).split(",")]


def frames_first(codes: torch.Tensor, reference: str, n_codebooks: int) -> torch.Tensor:
    """Codes as [frames, codebooks], whichever layout the fixture stores.

    The layout comes from the shape note of ``reference`` ("[T, n_vq]", "[32,T]", "[16,T] layout");
    without a readable note, from ``n_codebooks`` when exactly one axis has that size (a codebook
    axis may also be wider, e.g. 32 stored codebooks of which the model uses the first 16).
    """
    assert codes.dim() == 2, f"{reference}: expected 2-D codes, got {tuple(codes.shape)}"
    words = shape_note(reference)
    if words is not None and len(words) == 2:
        first, last = words
        if first in _TIME_WORDS or last in _CODEBOOK_WORDS or (last.isdigit() and not first.isdigit()):
            return codes
        if last in _TIME_WORDS or first in _CODEBOOK_WORDS or (first.isdigit() and not last.isdigit()):
            return codes.T
    rows, cols = codes.shape
    if (cols == n_codebooks) != (rows == n_codebooks):
        return codes if cols == n_codebooks else codes.T
    raise AssertionError(
        f"cannot tell the layout of {reference!r} (shape {tuple(codes.shape)}, {n_codebooks} codebooks): "
        "the manifest needs a shape note such as [T, n_vq] or [n_vq, T]"
    )


def _literal(text: str) -> object:
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return float(text)


def stated(case: dict, name: str, *sections: dict) -> object:
    """The value the fixture states for ``name``: the case's ``inputs``, then ``name=value`` in its
    ``pins`` prose, then a leading number in ``facts[name]`` ("1.0: no penalty acts ..."), then each
    of ``sections`` in order (e.g. the model's driver settings). Raises KeyError when none states it."""
    if name in case.get("inputs", {}):
        return case["inputs"][name]
    match = re.search(rf"\b{re.escape(name)}\s*=\s*([-+\w.]+)", case.get("pins", ""))
    if match:
        return _literal(match.group(1).rstrip(".,;"))
    fact = case.get("facts", {}).get(name)
    if isinstance(fact, int | float):
        return fact
    if isinstance(fact, str):
        number = re.match(r"\s*([-+]?\d+(?:\.\d+)?)", fact)
        if number:
            return _literal(number.group(1))
    for section in sections:
        if name in section:
            return section[name]
    raise KeyError(name)


def stated_or(case: dict, name: str, default: object, *sections: dict) -> object:
    """Like :func:`stated`, with ``default`` where the fixture states nothing (callers say why)."""
    try:
        return stated(case, name, *sections)
    except KeyError:
        return default


def max_new_tokens(case: dict) -> int:
    """``max_new_tokens`` as the case states it; there is no safe default, so a case must state it."""
    try:
        return int(stated(case, "max_new_tokens"))  # type: ignore[call-overload]
    except KeyError:
        raise AssertionError(f"{case['id']} does not state max_new_tokens") from None


# ---------------------------------------------------------------- Delay / Local generate cases


def prompt_of(case: dict, goldens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input_ids [B, L, 1+n_vq], attention_mask [B, L]) a generate or forward case names."""
    inputs = case["inputs"]
    return goldens[golden_key(inputs["input_ids"])], goldens[golden_key(inputs["attention_mask"])]


def output_key(case: dict, name: str, sample: int, segment: int | None = None) -> str:
    """The golden key of output ``name`` of one sample ("output_ids[0]" -> '...generate.x.0.output_ids');
    ``segment`` fills the '<i>' of per-segment outputs ("decoded_codes[0]" -> '....decoded_codes.<i>')."""
    key = golden_key(case["outputs"][f"{name}[{sample}]"])
    return key if segment is None else key.replace("<i>", str(segment))


def generation_facts(case: dict, model_dir: Path) -> list[dict]:
    """Per-sample facts of a generate case from ``<model>/cases.json`` (the outputs name the field)."""
    refs = [ref for ref in case["outputs"].values() if isinstance(ref, str) and "cases.json:" in ref]
    section, key = json_field(refs[0]) if refs else ("generation", case["id"])
    return json.loads((model_dir / "cases.json").read_text())[section][key]


def greedy_params(case: dict, penalty: float) -> SamplingParams:
    """Greedy batch-model decoding as a generate case states it. Temperatures default to 0: the
    README pins greedy decoding only, and a stated temperature above 0 fails here, since sampled
    goldens depend on upstream's RNG path and cannot be replayed. Top-k/top-p are taken when stated
    (they do not act under greedy decoding)."""
    for name in ("text_temperature", "audio_temperature"):
        value = float(stated_or(case, name, 0.0))  # type: ignore[arg-type]
        assert value <= 0, f"{case['id']}: {name}={value} is sampling; only greedy goldens can be replayed"
    params = SamplingParams(audio_repetition_penalty=penalty).greedy()
    tops = {}
    for name in ("text_top_k", "audio_top_k"):
        tops[name] = int(stated_or(case, name, getattr(params, name)))  # type: ignore[call-overload]
    for name in ("text_top_p", "audio_top_p"):
        tops[name] = float(stated_or(case, name, getattr(params, name)))  # type: ignore[arg-type]
    return replace(params, **tops)


def assert_generated_as_upstream(results: list, case: dict, goldens: dict[str, torch.Tensor], expected: list[dict]) -> None:
    """Per sample: the generated rows, their text channel and the decoded segments equal the golden."""
    assert len(results) == len(expected)
    for index, (result, facts) in enumerate(zip(results, expected, strict=True)):
        assert torch.equal(result.rows, goldens[output_key(case, "output_ids", index)])
        assert result.rows[:, 0].tolist() == facts["text_channel"]
        if facts.get("processor_decode_error") is None:  # upstream decode raised: no segments pinned
            assert [s.shape[0] for s in result.segments] == facts["segment_frames"]
            for i, segment in enumerate(result.segments):
                assert torch.equal(segment, goldens[output_key(case, "decoded_codes", index, i)])
