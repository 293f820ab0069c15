"""SmolLM2 on chat data: a chat JSONL run, emitted and validated with held-out chats (answer tokens only)."""
from __future__ import annotations

import json

import pytest

from toolkit import assets


@pytest.mark.integration
def test_smollm2_chat_run_emit_validate(smollm2_gguf, tmp_path):
    from toolkit import emit as emit_mod
    from toolkit.profiles import load_profile
    from toolkit.training import TrainOptions, train
    from toolkit.validate import validate

    if not assets.novel_path(assets.EVAL_NOVEL).exists():
        pytest.skip("Austen text missing; run `coalora assets --fetch`")
    train_file, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train_file.write_text("".join(json.dumps(c) + "\n" for c in assets.austen_chats("emma")))
    # 32 held-out chats, 256 tokens each (about 2,100 answer tokens): on 8 x 128 (about 330) the torch vs
    # llama.cpp residual of the same files spread over +-1%, past the 0.5% verdict
    held.write_text("".join(json.dumps(c) + "\n" for c in assets.austen_chats(assets.EVAL_NOVEL)[:32]))
    run = train(tmp_path / "run", smollm2_gguf, [train_file], TrainOptions(steps=16, seq_len=128, batch=2, rounds=1,
                search_candidates=2, checkpoint_every=16, lr=2e-3, cam_lr=2e-3, imatrix=""), progress=False, log=lambda s: None)
    summary = run.meta["data_summary"]
    assert summary["format"] == "chat" and 0 < summary["loss_tokens"] < summary["tokens"]
    # no confirmation (its windows of records are measured as in training's search, tested on the tiny run)
    m = emit_mod.emit(run, load_profile("rpi4-4gb"), tmp_path / "dist", n_windows=32, n_ctx=256, text_path=held,
                      confirm=0)
    assert m["evaluation"]["data_format"] == "chat"
    r = validate(tmp_path / "dist" / "rpi4-4gb", data=held, measure_memory=False)
    ev = r["evaluation"]
    assert ev["same_windows_as_manifest"] and r["verdicts"]["perplexity_matches_prediction"], ev
    assert ev["perplexity_adapter"] < ev["perplexity_base"], ev
