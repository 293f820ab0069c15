"""`coalora package DIST/NAME -o NAME.tar.gz`: the pair, its manifest and a README for the device, in one archive.

The folder gets validate's checks that need no llama.cpp first (manifest schema, exactly the listed files and
their checksums, the model and adapter GGUFs, the manifest's recomputable values), so a damaged pair is never
shipped; the archive is written to a temporary file and renamed.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from converters.errors import CoaloraError
from converters.fileio import atomic_path


ADAPTER_TEXT = {"generated": "the LoRA adapter generated for exactly this quantization configuration",
                "shared": "the run's shared LoRA adapter (on this configuration the generated one measured no better)"}


def readme(manifest: dict) -> str:
    p, c, ev = manifest["profile"], manifest["commands"], manifest["evaluation"]
    mem = manifest["memory"]
    hist = ", ".join(f"{k} x{v}" for k, v in manifest["histogram"].items())
    return f"""# {p['name']}: model + CoA-LoRA adapter for llama.cpp

{p['description']}

- `model.gguf`: mixed-precision model, {manifest['files']['model.gguf']['bytes'] / 1e6:.1f} MB,
  {manifest['search']['bits_per_weight']:.2f} bits per weight ({hist})
- `adapter.gguf`: {ADAPTER_TEXT[manifest['search'].get('adapter', 'generated')]}
  ({manifest['files']['adapter.gguf']['bytes'] / 1e6:.1f} MB); always load the two together
- `manifest.json`: configuration, sha256 of both files, predictions

Predicted perplexity on {ev['n_windows']} x {ev['n_ctx']}-token windows of {ev['text']}: {ev['predicted_perplexity']:.3f}.
Predicted memory with a {p['context_length']}-token context: {mem['total_bytes'] / 2**20:.0f} MiB
(model {mem['model_bytes'] / 2**20:.0f}, repacked weights {mem.get('repack_bytes', 0) / 2**20:.0f}, adapter {mem['adapter_bytes'] / 2**20:.0f}, KV cache {mem['kv_cache_bytes'] / 2**20:.0f},
compute {mem['compute_bytes'] / 2**20:.0f}, runtime {mem['overhead_bytes'] / 2**20:.0f} MiB).

Check the files: `sha256sum model.gguf adapter.gguf` and compare with `manifest.json`.

Chat in a terminal:

    {c['llama-cli']}

Serve an OpenAI-compatible API:

    {c['llama-server']}
"""


def package(dist_dir, out_tar_gz) -> Path:
    from toolkit.emit import ADAPTER_FILE, MANIFEST, MODEL_FILE
    from toolkit.validate import check_dist

    dist_dir = Path(dist_dir)
    manifest = check_dist(dist_dir)["manifest"]
    out = Path(out_tar_gz)
    if out.resolve().is_relative_to(dist_dir.resolve()):
        raise CoaloraError("write the archive outside the folder being packaged")
    name = manifest["profile"]["name"]
    text = readme(manifest).encode()
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in (MODEL_FILE, ADAPTER_FILE, MANIFEST):
                tar.add(dist_dir / f, arcname=f"{name}/{f}", filter=_clean)
            info = _clean(tarfile.TarInfo(f"{name}/README.md"))
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return out


def _clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info
