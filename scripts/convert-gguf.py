#!/usr/bin/env python3
"""Convert a moedeploy checkpoint (the demo model, or any with a byte-level BPE tokenizer that splits like
GPT-2) to GGUF with llama.cpp's own converter, so llama.cpp can be compared on the same weights.

    python scripts/convert-gguf.py --llama-cpp ~/src/llama.cpp [--model DIR] --outtype bf16 --outfile demo-bf16.gguf

llama.cpp's converter recognises a tokenizer's pre-tokenizer by a hash of its output on a probe text, and
refuses ones it does not know. The demo tokenizer uses GPT-2's split regex (a ByteLevel pre-tokenizer), which
llama.cpp calls "gpt-2": this script checks that, names it for the converter, and runs the converter. Needs a
llama.cpp checkout (convert_hf_to_gguf.py and gguf-py/, which this script puts on the path); moedeploy's
environment has the rest the converter needs for these models (numpy, torch, transformers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "moedeploy" / "data" / "demo"


def check_tokenizer(model: Path) -> None:
    """The tokenizer must pre-tokenize like GPT-2 (byte-level BPE with GPT-2's split), or the mapping is wrong."""
    spec = json.loads((model / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
    if "ByteLevel" not in kinds or spec.get("model", {}).get("type") != "BPE":
        sys.exit(f"convert-gguf: {model}/tokenizer.json is not a byte-level BPE tokenizer (pre-tokenizer {kinds}); "
                 "llama.cpp's 'gpt-2' pre-tokenizer would not match it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp checkout")
    p.add_argument("--model", type=Path, default=DEMO, help="checkpoint directory (default: the demo model)")
    p.add_argument("--outtype", default="bf16", help="f32, f16, bf16 or q8_0 (llama.cpp's converter types)")
    p.add_argument("--outfile", type=Path, required=True)
    args = p.parse_args()
    root = args.llama_cpp.resolve()
    if not (root / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"convert-gguf: {root} has no convert_hf_to_gguf.py; give a llama.cpp checkout with --llama-cpp")
    check_tokenizer(args.model)
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    converter = importlib.import_module("convert_hf_to_gguf")
    # Newer llama.cpp keeps the model classes in conversion/base.py, older ones in the converter itself.
    owners = [importlib.import_module(m) for m in ("conversion.base",) if (root / "conversion").is_dir()] + [converter]
    patched = False
    for module in owners:
        for cls in vars(module).values():
            if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
                cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
                patched = True
    if not patched:
        sys.exit("convert-gguf: this llama.cpp's converter has no get_vocab_base_pre to name the pre-tokenizer in")
    sys.argv = ["convert_hf_to_gguf.py", str(args.model), "--outtype", args.outtype, "--outfile", str(args.outfile)]
    converter.main()


if __name__ == "__main__":
    main()
