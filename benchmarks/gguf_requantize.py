"""What `--gguf-requantize` costs and keeps, on real weights; and the GGUF load table.

Nothing is downloaded. The real weights are the bundled SmolLM2-135M-Instruct (Q4_1): decoded
with gguf-py they are the "true" weights, written again as a Q4_K_M-like and a Q6_K file the
way llama.cpp would (K-quants where a row is a multiple of 256 weights; the fallbacks llama.cpp
uses elsewhere: Q5_0 for Q4_K, Q8_0 for Q6_K). Each file is converted with each setting and
compared with `none` (the file's exact weights as floats, the baseline of the same run):
weight error, greedy agreement on a few chat prompts, decode speed, load time and memory.

    .venv/bin/python benchmarks/gguf_requantize.py            # the setting's measurements
    .venv/bin/python benchmarks/gguf_requantize.py --table    # architecture x quant type table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.utils import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mlx_engine_server.models.gguf import convert_gguf  # noqa: E402
from mlx_engine_server.models.loader import describe_quantization, read_model_config  # noqa: E402
from tests.gguf_factory import quantize, write_tiny_model  # noqa: E402
from tests.model_factory import smollm_gguf_path  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a colour of the rainbow.",
]
# (most matrices, the "high" roles); SmolLM2's 576-wide rows take the fallbacks, so only its
# FFN down projections (1536 wide) are K-quants: Q4_K_S is there to measure Q4_K itself.
SCHEMES = {
    "Q4_K_M": (QType.Q4_K, QType.Q6_K),
    "Q4_K_S": (QType.Q4_K, QType.Q4_K),
    "Q6_K": (QType.Q6_K, QType.Q6_K),
}
FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q6_K: QType.Q8_0}
HIGH_ROLES = ("attn_v", "ffn_down", "token_embd", "output")
SETTINGS = ("none", "4", "8", "auto")
TABLE_ARCHS = ("llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi3_long")
TABLE_SCHEMES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")


def storage_type(name: str, cols: int, scheme: str) -> QType:
    main, high = SCHEMES[scheme]
    wanted = high if name.split(".")[-2] in HIGH_ROLES else main
    return FALLBACK[wanted] if cols % 256 else wanted


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def rewrite_smollm(dest: Path, scheme: str) -> tuple[Path, dict[str, QType]]:
    """SmolLM2's true weights in `scheme`; returns the file and each tensor's new type."""
    reader = GGUFReader(smollm_gguf_path())
    writer = GGUFWriter(str(dest), "llama")
    copy_metadata(reader, writer)
    types: dict[str, QType] = {}
    for tensor in reader.tensors:
        floats = quants.dequantize(tensor.data, tensor.tensor_type)
        if floats.ndim == 1:
            writer.add_tensor(tensor.name, floats.astype(np.float32))
            continue
        types[tensor.name] = storage_type(tensor.name, floats.shape[-1], scheme)
        raw, _ = quantize(floats, types[tensor.name])
        writer.add_tensor(tensor.name, raw, raw_dtype=types[tensor.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest, types


def parameter_bytes(model: Any) -> int:
    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))


def timed_load(model_dir: Path) -> tuple[Any, Any, float]:
    began = time.perf_counter()
    model, tokenizer = load(str(model_dir))[:2]
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, tokenizer, time.perf_counter() - began


def greedy_answers(
    model: Any, tokenizer: Any, max_tokens: int, prompts: list[str]
) -> tuple[list[list[int]], float]:
    answers, tokens, elapsed = [], 0, 0.0
    for question in prompts:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        began = time.perf_counter()
        text = generate(model, tokenizer, prompt, max_tokens=max_tokens)
        elapsed += time.perf_counter() - began
        answers.append(tokenizer.encode(text, add_special_tokens=False))
        tokens += len(answers[-1])
    return answers, tokens / elapsed


def agreement(answers: list[list[int]], baseline: list[list[int]]) -> tuple[int, float]:
    """Prompts answered identically, and the mean share of tokens before the first change."""
    same = sum(a == b for a, b in zip(answers, baseline, strict=True))
    shares = []
    for a, b in zip(answers, baseline, strict=True):
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        common = min(len(a), len(b)) if common is None else common
        shares.append(common / max(len(b), 1))
    return same, float(np.mean(shares))


def dense(params: dict[str, mx.array], layer: str) -> np.ndarray:
    """A matrix as floats, dequantized if it is packed."""
    weight = params[f"{layer}.weight"]
    if f"{layer}.scales" in params:
        scales, biases = params[f"{layer}.scales"], params[f"{layer}.biases"]
        bits = weight.shape[-1] // scales.shape[-1]  # 32 weights a group, 32 bits a word
        weight = mx.dequantize(weight, scales, biases, group_size=32, bits=bits)
    return np.array(weight.astype(mx.float32))


def weight_errors(model: Any, baseline: Any) -> tuple[float, float]:
    """Largest absolute and relative-RMS error of the matrices against the baseline's."""
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(baseline.parameters()))
    worst_abs, worst_rms = 0.0, 0.0
    for name, reference in theirs.items():
        if not name.endswith(".weight") or reference.ndim != 2:
            continue
        layer = name.removesuffix(".weight")
        truth = dense(theirs, layer)
        diff = dense(ours, layer) - truth
        worst_abs = max(worst_abs, float(np.abs(diff).max()))
        worst_rms = max(worst_rms, float(np.sqrt((diff**2).mean() / (truth**2).mean())))
    return worst_abs, worst_rms


def mx_load_q4_k_error(path: Path) -> float:
    """How far `mx.load`'s Q4_K decoding is from gguf-py's, over the file's Q4_K tensors."""
    loaded = mx.load(str(path))
    worst = 0.0  # 0 when the file has no Q4_K
    for tensor in GGUFReader(path).tensors:
        if tensor.tensor_type == QType.Q4_K:
            ours = quants.dequantize(tensor.data, tensor.tensor_type)
            theirs = np.array(loaded[tensor.name].astype(mx.float32))  # type: ignore[index]
            worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def measure_settings(work: Path, max_tokens: int, schemes: list[str], prompts: list[str]) -> None:
    print(f"SmolLM2-135M rewritten; {len(prompts)} chat prompts, {max_tokens} greedy tokens")
    header = "scheme  setting  convert_s  load_s  MB     tok/s  same  prefix  max|dw|  rel-rms"
    for scheme in schemes:
        path, types = rewrite_smollm(work / f"smollm-{scheme}.gguf", scheme)
        counts = {kind.name: list(types.values()).count(kind) for kind in set(types.values())}
        print(f"\n{scheme}: {counts}; file {path.stat().st_size / 1e6:.1f} MB")
        try:
            print(f"  mx.load's Q4_K decoding vs gguf-py: max |dw| {mx_load_q4_k_error(path):.4f}")
        except RuntimeError as exc:
            print(f"  mx.load refuses the file: {exc}")
        print(header)
        baseline: tuple[Any, list[list[int]]] | None = None
        for setting in SETTINGS:
            began = time.perf_counter()
            model_dir = convert_gguf(path, work / "cache", setting)  # type: ignore[arg-type]
            convert_s = time.perf_counter() - began
            model, tokenizer, load_s = timed_load(model_dir)
            answers, speed = greedy_answers(model, tokenizer, max_tokens, prompts)
            if baseline is None:
                baseline = (model, answers)
            same, prefix = agreement(answers, baseline[1])
            worst_abs, worst_rms = weight_errors(model, baseline[0])
            print(
                f"{scheme:7} {setting:8} {convert_s:9.1f} {load_s:7.2f} "
                f"{parameter_bytes(model) / 1e6:6.1f} {speed:6.1f} {same:3}/{len(prompts)} "
                f"{prefix:6.2f} {worst_abs:8.4f} {worst_rms:8.4f}"
            )


def load_table(work: Path) -> None:
    print("arch       file     convert_s  load_s  params MB  status quantization")
    rows: list[tuple[str, str, Path | None]] = [
        (arch, scheme, None) for arch in TABLE_ARCHS for scheme in TABLE_SCHEMES
    ]
    rows.append(("llama", "Q4_1", smollm_gguf_path()))
    for arch, scheme, given in rows:
        path = given or write_tiny_model(work / f"{arch}-{scheme}.gguf", arch, scheme).path
        began = time.perf_counter()
        model_dir = convert_gguf(path, work / "table-cache")
        convert_s = time.perf_counter() - began
        model, _, load_s = timed_load(model_dir)
        mx.eval(model(mx.array([[1, 2, 3]])))  # it runs
        quant = describe_quantization(read_model_config(model_dir))
        name = "SmolLM2" if given else "tiny"
        print(
            f"{arch:10} {scheme:8} {convert_s:9.2f} {load_s:7.2f} "
            f"{parameter_bytes(model) / 1e6:10.2f}  {quant} ({name})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="the architecture x type table")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many to ask")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.table:
            load_table(Path(tmp))
        else:
            prompts = PROMPTS[: args.prompts]
            measure_settings(Path(tmp), args.max_tokens, args.schemes, prompts)


if __name__ == "__main__":
    main()
