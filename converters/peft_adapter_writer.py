"""Write a generated adapter as a Hugging Face PEFT LoRA folder (adapter_config.json + safetensors)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from converters.errors import CoaloraError


def write_peft(out_dir, loaded, tensors: dict[str, tuple[np.ndarray, np.ndarray]], rank: int, alpha: float) -> int:
    """``tensors``: GGUF base name -> (A [r, n_in], B [n_out, r] in GGUF row order). Returns bytes written."""
    out_dir = Path(out_dir)
    state, modules = {}, set()
    for name, (a, b) in tensors.items():
        hf = loaded.hf_name(name).rsplit(".", 1)[0]  # model.layers.0.self_attn.q_proj
        modules.add(hf.rsplit(".", 1)[-1])
        state[f"base_model.model.{hf}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a))
        state[f"base_model.model.{hf}.lora_B.weight"] = torch.from_numpy(
            np.ascontiguousarray(loaded.to_hf_order(name, b), dtype=np.float32))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "target_modules": sorted(modules),
              "base_model_name_or_path": str(loaded.source), "inference_mode": True}
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise CoaloraError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        save_file(state, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return sum(f.stat().st_size for f in out_dir.iterdir())
