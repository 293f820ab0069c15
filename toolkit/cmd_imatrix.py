"""`coalora imatrix`: the importance matrix of a model over a text, in llama.cpp's imatrix GGUF format."""
from __future__ import annotations

import json
from pathlib import Path

import click

from converters.errors import CoaloraError


def register(cli: click.Group) -> None:
    @cli.command("imatrix")
    @click.argument("model")
    @click.option("--data", "-d", multiple=True, default=("austen",), show_default=True,
                  help="Text files or record files (as `coalora train` reads them); 'austen' = the five training novels.")
    @click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                  help="Output imatrix file (.gguf: llama.cpp's format, read by llama-quantize --imatrix; "
                       ".dat: the legacy one).")
    @click.option("--chunks", default=64, show_default=True, type=click.IntRange(1),
                  help="At most this many chunks of --seq-len tokens.")
    @click.option("--seq-len", default=512, show_default=True, type=click.IntRange(16),
                  help="Tokens per chunk (llama-imatrix's context size).")
    @click.option("--batch", default=4, show_default=True, type=click.IntRange(1), help="Chunks per forward pass.")
    @click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
    @click.option("--data-format", type=click.Choice(["auto", "chat", "instruction", "text"]), default="auto",
                  show_default=True, help="How record files are read (see `coalora train --help`).")
    @click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU when torch sees one), cpu, cuda[:N].")
    @click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
    def imatrix_cmd(model, data, out, chunks, seq_len, batch, process_output, data_format, device, as_json):
        """Compute the importance matrix of MODEL over --data as llama.cpp's llama-imatrix does (the sum of the
        squared input activations of every block weight matrix, per column, and the token count).

        Example: coalora imatrix smollm2 --data austen -o imatrix.gguf --chunks 64
        """
        from toolkit import assets, importance
        from toolkit.run import resolve_device

        if out.suffix not in (".gguf", ".dat"):
            raise CoaloraError(f"output {out}: name it .gguf (llama.cpp's format) or .dat (the legacy one)")
        if out.is_dir():
            raise CoaloraError(f"output {out} is a directory")
        dev = resolve_device(device)
        texts = assets.resolve_texts(data)
        if not texts:
            raise CoaloraError("no data given (--data FILE..., or --data austen)")
        from converters.model_loading import load_model
        loaded = load_model(assets.resolve_model(model))
        ids, valid = importance.data_windows(loaded, texts, seq_len, chunks, data_format)
        im = importance.compute(loaded, ids, valid, device=dev, batch=batch, process_output=process_output,
                                datasets=texts, progress=not as_json)
        if out.suffix == ".dat":
            from converters.imatrix import save_dat
            save_dat(im, out)
        else:
            im.save(out)
        info = {"imatrix": str(out), "entries": len(im.sums), "chunks": im.chunk_count, "chunk_size": im.chunk_size,
                "tokens": int(next(iter(im.counts.values()))[0]), "device": str(dev)}
        click.echo(json.dumps(info, indent=2) if as_json else
                   f"wrote {out}: {info['entries']} weight matrices, {info['chunks']} chunks of {info['chunk_size']} "
                   f"tokens ({info['tokens']:,} tokens) on {dev}")
