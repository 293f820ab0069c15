"""A tiny Llama trained from scratch in float on training novels: a model whose weights lie on no quantization
grid, to check on it the conclusions drawn on SmolLM2 (whose weights were dequantized from Q4_1).

Protocol: a byte-level BPE tokenizer (--vocab tokens) trained on the --novels (by default the five training
novels; leave out the ones a LoRA is to fine-tune on, so that its text is as new to the model as the
held-out novel); a Llama of
--hidden x --layers (FFN --ffn, 4 heads, 2 KV heads, untied head, default rope) with transformers' random
initialisation (seed 0); AdamW (lr 2e-3, weight decay 0.1, 5% warmup then cosine) for --steps steps of
--batch x --seq-len tokens drawn at random from those novels; float32 throughout. The held-out loss is
torch's on the first 16 windows of --seq-len tokens of Pride and Prejudice. Writes the Hugging Face folder to
--out (safetensors, config, tokenizer) and bench/results/float_model.{md,json} (--name NAME: NAME.{md,json}):
the curve, the held-out perplexity and the sha256 of the weights (training on another CPU gives other weights).

    python bench/float_model.py --out bench/work/float-llama
    python bench/float_model.py --out bench/work/float-llama-4 --novels emma,mansfieldpark,northangerabbey,\
        sensesensibility --steps 800 --name float_model-4novels    # Persuasion left for the LoRA
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, write_results  # noqa: E402
from toolkit.assets import TRAIN_NOVELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--novels", default=",".join(TRAIN_NOVELS), help="the novels to train on, comma-separated")
    ap.add_argument("--name", default="float_model", help="result file name (NAME.json, NAME.md)")
    args = ap.parse_args()
    novels = args.novels.split(",")
    if not novels or not set(novels) <= set(TRAIN_NOVELS):
        ap.error(f"--novels: choose among {', '.join(TRAIN_NOVELS)} (Pride and Prejudice is held out)")

    import torch
    import transformers
    from tqdm import tqdm

    from converters.fileio import sha256_file
    from tests.conftest import build_tiny_tokenizer  # the tests' byte-level BPE, trained on the novels here
    from toolkit import assets

    torch.manual_seed(0)
    train = [p.read_text(encoding="utf-8") for p in assets.require_novels(novels)]
    held = assets.require_novels([assets.EVAL_NOVEL])[0].read_text(encoding="utf-8")
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(args.out, texts=train, vocab_size=args.vocab, chat_template=None)
    ids = torch.tensor([t for text in train for t in [tok.bos_token_id, *tok(text)["input_ids"]]])
    held_ids = torch.tensor(tok(held)["input_ids"])
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * args.seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm)))))
    gen = torch.Generator().manual_seed(0)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            w = held_ids[: 16 * args.seq_len].view(16, args.seq_len)
            loss = sum(model(w[i:i + 4], labels=w[i:i + 4]).loss.item() for i in range(0, 16, 4)) / 4
        model.train()
        return loss

    curve, t0 = [], time.time()
    bar = tqdm(range(args.steps), desc="training from scratch", unit="step")
    for step in bar:
        starts = torch.randint(0, len(ids) - args.seq_len, (args.batch,), generator=gen)
        x = torch.stack([ids[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % max(1, args.steps // 8) == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4), "held_out_loss": held_loss()})
    seconds = time.time() - t0
    model.save_pretrained(args.out, safe_serialization=True)
    final = curve[-1]["held_out_loss"]
    data = {"out": str(args.out), "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "params": sum(p.numel() for p in model.parameters()), "train_tokens": len(ids),
            "seconds": round(seconds, 1), "curve": curve, "held_out_loss": final,
            "held_out_ppl": math.exp(final), "weights_sha256": sha256_file(args.out / "model.safetensors")}
    md = (f"A Llama trained from scratch in float32 (hidden {args.hidden}, FFN {args.ffn}, {args.layers} blocks, "
          f"vocabulary {len(tok)}, {data['params']:,} parameters) on {_novels(novels)} "
          f"({len(ids):,} tokens), {args.steps} steps of {args.batch} x {args.seq_len} tokens in {seconds:.0f} s. "
          f"Held-out loss: torch on 16 x {args.seq_len} tokens of Pride and Prejudice; final perplexity "
          f"{math.exp(final):.2f}. Weights sha256 {data['weights_sha256'][:12]}.\n\n"
          + markdown_table(curve, [("step", "step"), ("train_loss", "train loss (batch)"),
                                   ("held_out_loss", "held-out loss")]))
    write_results(args.name, data, md)


def _novels(novels: list[str]) -> str:
    return "the five training novels" if set(novels) == set(TRAIN_NOVELS) else "the novels " + ", ".join(novels)


if __name__ == "__main__":
    main()
