"""Record data (chat, instruction, text in JSONL / JSON / Parquet / CSV): chat template, answer-only loss mask,
windows per record, reproducible batches, training on answers, bad input."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import TINY_CHAT_TEMPLATE
from converters.model_loading import load_model
from toolkit.cli import main
from toolkit.records import build_windows, render_chat
from toolkit.text_data import RecordStream
from toolkit.training import TrainOptions, train

GEN_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}</s>\n{% endgeneration %}{% else %}{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
WORDS = "house sister letter morning evening mother colonel Barton Norland happiness feelings".split()


def chats(n: int, seed: int = 0, turns: int = 2) -> list[dict]:
    """Conversations whose answers follow a pattern (learnable) and whose questions are random words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You answer briefly."}] if rng.random() < 0.5 else []
        for _ in range(turns):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {q.split()[-1]}."}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_mask_equals_assistant_spans_of_apply_chat_template(tiny):
    tok = tiny.tokenizer
    for rec in chats(12, seed=1, turns=3):
        ids, mask = render_chat(tok, GEN_TEMPLATE, rec["messages"], "test")
        ref = tok.apply_chat_template(rec["messages"], chat_template=GEN_TEMPLATE, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ids == list(ref["input_ids"])
        assert [bool(x) for x in ref["assistant_masks"]] == mask
        assert 0 < sum(mask) < len(mask)


def test_windows_hold_one_record_each_and_are_reproducible(tiny, tmp_path):
    rows = chats(40, seed=2)
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    a = build_windows(tiny.tokenizer, TINY_CHAT_TEMPLATE, [f], seq_len=96)
    b = build_windows(tiny.tokenizer, TINY_CHAT_TEMPLATE, [f], seq_len=96)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
    assert a.summary.format == "chat" and a.summary.records == 40 and len(a.ids) == 40
    pad = tiny.tokenizer.pad_token_id
    for i, rec in enumerate(rows):  # window i is record i's rendering and nothing else
        ids, mask = render_chat(tiny.tokenizer, TINY_CHAT_TEMPLATE, rec["messages"], "t")
        assert list(a.ids[i, :len(ids)]) == ids[:96] and (a.ids[i, len(ids):] == pad).all()
        assert list(a.mask[i, 1:len(ids)]) == mask[1:96] and not a.mask[i, len(ids):].any()
    s1, s2 = (RecordStream(w.ids, w.mask, w.record) for w in (a, b))
    for step in range(3):
        x1, y1 = s1.labelled_batch(0, step, 4)
        x2, y2 = s2.labelled_batch(0, step, 4)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert ((y1 == -100) | (y1 == x1)).all()
    held = set(a.record[len(s1.train_ids):].tolist())
    assert held and not held & set(a.record[:len(s1.train_ids)].tolist())  # whole records held out


def test_instruction_text_and_formats(tiny, tmp_path):
    import pandas as pd
    inst = tmp_path / "inst.parquet"
    pd.DataFrame({"prompt": ["say hi", "say bye"], "completion": ["hi", "bye"]}).to_parquet(inst)
    text = tmp_path / "t.csv"
    pd.DataFrame({"text": ["Elinor said so. " * 30, "Marianne did not."]}).to_csv(text, index=False)
    arr = tmp_path / "chat.json"
    arr.write_text(json.dumps(chats(3, seed=4)))
    w = build_windows(tiny.tokenizer, TINY_CHAT_TEMPLATE, [inst, text, arr], seq_len=32)
    assert w.summary.format == "chat+instruction+text"
    assert w.summary.records == 2 + 2 + 3
    inst_mask = w.mask[0]
    ids, mask = render_chat(tiny.tokenizer, TINY_CHAT_TEMPLATE, [{"role": "user", "content": "say hi"},
                                                                 {"role": "assistant", "content": "hi"}], "t")
    assert list(inst_mask[1:len(ids)]) == mask[1:]
    text_rows = w.mask[(w.record == 2) | (w.record == 3)]
    assert text_rows[:, 1:].any(axis=1).all()  # text: every token a target
    assert w.summary.truncated == sum(len(render_chat(tiny.tokenizer, TINY_CHAT_TEMPLATE, r["messages"], "t")[0]) > 32
                                      for r in chats(3, seed=4))


def _answer_prompt_nll(run, windows) -> tuple[float, float]:
    model = run.model()
    model.set_configuration(run.layout.uniform("F32"))
    ids, mask = torch.from_numpy(windows.ids), torch.from_numpy(windows.mask)
    pad = ids == run.loaded().tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(len(ids), -1)
    ans, prompt = mask[:, 1:], ~mask[:, 1:] & ~pad[:, 1:]
    return float(nll[ans].mean()), float(nll[prompt].mean())


def test_answer_only_training_lowers_answer_loss_more(tiny_model_dir, tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chats(120, seed=5))
    held = write_jsonl(tmp_path / "held.jsonl", chats(16, seed=6))
    opts = dict(steps=24, seq_len=96, batch=4, lr=1e-2, rounds=1, checkpoint_every=24, search_candidates=2, imatrix="")
    before = train(tmp_path / "r0", tiny_model_dir, [data], TrainOptions(**{**opts, "steps": 1, "lr": 1e-9}),
                   progress=False, log=lambda s: None)
    w = build_windows(tiny.tokenizer, TINY_CHAT_TEMPLATE, [held], seq_len=96)
    a0, p0 = _answer_prompt_nll(before, w)
    assert main(["train", str(tiny_model_dir), "-o", str(tmp_path / "r1"), "--data", data, "--eval-data", held,
                 "--steps", "24", "--seq-len", "96", "--batch", "4", "--lr", "1e-2", "--rounds", "1",
                 "--search-candidates", "2", "--checkpoint-every", "24", "--recipe", "plain", "--no-imatrix",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"]["format"] == "chat" and summary["data"]["records"] == 120
    assert 0 < summary["data"]["loss_tokens"] < summary["data"]["tokens"]
    from toolkit.run import Run
    after = Run.open(tmp_path / "r1")
    assert set(after.meta["data_sha256"]) == {str((tmp_path / "train.jsonl").resolve()),
                                             str((tmp_path / "held.jsonl").resolve())}
    a1, p1 = _answer_prompt_nll(after, w)
    assert a0 - a1 > 0.5 and (a0 - a1) > 2 * (p0 - p1), (a0, a1, p0, p1)


@pytest.mark.parametrize("content, pattern", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"bad\.jsonl: line 2: invalid JSON"),
    ('{"question": "hi"}\n', r"bad\.jsonl: no usable field \(messages, prompt \+ completion, or text\); columns: question"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     r"bad\.jsonl: record 1: unknown role 'wizard'"),
    ("", r"bad\.jsonl: empty file"),
])
def test_bad_records_refused(tiny_model_dir, tmp_path, capsys, content, pattern):
    import re
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    rc = main(["train", str(tiny_model_dir), "-o", str(tmp_path / "run"), "--data", str(bad), "--steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len([ln for ln in lines if "error" in ln]) == 1 and re.search(pattern, lines[-1]), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["null", "1", '"text"'])
def test_json_file_of_a_bare_value_refused(tmp_path, content):
    """pyarrow's JSON reader crashes the process on a bare `null`: such files never reach it."""
    from converters.errors import CoaloraError
    from toolkit.records import read_records
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(CoaloraError, match=r"bad\.json: a JSON data file holds a list of records"):
        read_records(bad)


def test_parquet_without_usable_column_and_model_without_template(tiny_model_dir, tmp_path, capsys):
    import shutil

    import pandas as pd
    pq = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(pq)
    assert main(["train", str(tiny_model_dir), "-o", str(tmp_path / "run"), "--data", str(pq)]) == 1
    assert "x.parquet: no usable field" in capsys.readouterr().err
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    data = write_jsonl(tmp_path / "c.jsonl", chats(10))
    assert main(["train", str(plain), "-o", str(tmp_path / "run2"), "--data", data]) == 1
    assert "needs the model's chat template" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_emit_and_validate_on_held_out_chats(tiny_model_dir, tmp_path):
    """A chat run emitted and validated with held-out chat records: llama.cpp scores the answers only, the
    adapter lowers their perplexity, and torch's prediction matches."""
    from test_deploy import TINY_PROFILE
    from toolkit import emit as emit_mod
    from toolkit.profiles import load_profile
    from toolkit.validate import validate
    data = write_jsonl(tmp_path / "train.jsonl", chats(120, seed=5))
    held = write_jsonl(tmp_path / "held.jsonl", chats(12, seed=7))
    run = train(tmp_path / "run", tiny_model_dir, [data], TrainOptions(steps=24, seq_len=96, batch=4, lr=1e-2,
                rounds=1, checkpoint_every=24, search_candidates=2, imatrix=""), progress=False, log=lambda s: None)
    (tmp_path / "p.toml").write_text(TINY_PROFILE)
    m = emit_mod.emit(run, load_profile(tmp_path / "p.toml"), tmp_path / "dist", n_windows=8, n_ctx=96,
                      text_path=held)
    assert m["evaluation"]["data_format"] == "chat"
    r = validate(tmp_path / "dist" / "tiny-test", threads=2, data=held)
    ev = r["evaluation"]
    assert r["ok"], r["verdicts"]
    assert ev["same_windows_as_manifest"] and ev["n_windows"] == 8 and ev["data_format"] == "chat"
    assert ev["perplexity_adapter"] < ev["perplexity_base"], ev
    assert abs(ev["relative_difference"]) < 0.005, ev
    _, masks, *_ = emit_mod.eval_set(tmp_path / "dist" / "tiny-test" / "model.gguf", held, 8, 96)
    assert r["reference"]["base"]["positions"] == sum(sum(m[1:]) for m in masks)  # the answer positions only
    assert ev["scored_tokens"] == sum(sum(m[1:]) for m in masks)


def test_resume_on_records_matches_uninterrupted_and_refuses_changed_data(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, chats(60, seed=8))
    opts = TrainOptions(steps=6, seq_len=96, batch=2, lr=1e-2, rounds=1, checkpoint_every=2, search_candidates=2,
                        imatrix="")
    full = train(tmp_path / "full", tiny_model_dir, [data], opts, progress=False, log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", tiny_model_dir, [data], opts, progress=False, log=lambda s: None, interrupt_at=3)
    resumed = train(tmp_path / "cut", None, [], opts, resume=True, progress=False, log=lambda s: None)
    a, b = full.model().lora_state(), resumed.model().lora_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut2", tiny_model_dir, [data], opts, progress=False, log=lambda s: None, interrupt_at=3)
    write_jsonl(data, chats(60, seed=9))
    from converters.errors import CoaloraError
    with pytest.raises(CoaloraError, match="train.jsonl changed since the run started"):
        train(tmp_path / "cut2", None, [], opts, resume=True, progress=False, log=lambda s: None)
