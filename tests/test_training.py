"""CoA-LoRA training on a tiny model: exactness against llama.cpp, resume, adapters, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_corpus
from converters.gguf_model_writer import write_gguf
from toolkit import evaluation, llama_runtime, training
from toolkit.cli import main
from converters.configuration import Configuration
from toolkit.run import Run
from toolkit.training import TrainOptions, train

# imatrix "": these tests' runs quantize without an importance matrix (tests/test_imatrix.py trains with one; its
# IQ types would widen every search and add minutes to the suite)
FAST = dict(steps=8, seq_len=32, batch=2, lr=1e-2, cam_lr=1e-2, rounds=2, checkpoint_every=4, search_candidates=4,
            imatrix="")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text(tiny_corpus(6000, seed=1))
    return p


@pytest.fixture(scope="module")
def coa_run(tiny_model_dir, text_file, tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs") / "coa", tiny_model_dir, [text_file], TrainOptions(**FAST),
                 progress=False, log=lambda s: None)


def _mixed(run: Run) -> Configuration:
    """A configuration mixing 32-block and K-quant types across tensors."""
    types = {}
    for i, name in enumerate(run.layout.names()):
        menu = [q.name for q in run.layout.menu(name)]
        types[name] = menu[(3 * i + 1) % len(menu)]
    return Configuration(types)


def test_trained_run_has_everything(coa_run):
    run = Run.open(coa_run.path)
    assert run.meta["status"] == "trained" and run.meta["step"] == FAST["steps"]
    assert len(run.trainset()) >= 2
    for f in ("checkpoint.safetensors", "trainset.json", "archive.json", "pareto.json", "pareto.png", "tokens.npy"):
        assert (run.path / f).exists(), f


def test_llama_cpp_files_stay_in_the_training_set(coa_run):
    """The uniform files (and llama-quantize's mixes) that search and emit always weigh are trained on, through the
    search rounds too."""
    run = Run.open(coa_run.path)
    files = training.llama_cpp_files(run)
    assert run.layout.uniform("Q8_0") in files and run.layout.uniform("Q4_0") in files
    assert set(files) <= set(run.trainset())
    asked = set(run.meta["options"]["menu"])
    assert all(q.name in asked for c in files for q in c.types.values()), "only the types asked for"
    assert len(run.trainset()) > len(files), "the Pareto fronts are trained on as well"


def test_adapter_depends_on_configuration(coa_run):
    run = Run.open(coa_run.path)
    a8 = run.adapter_tensors(run.layout.uniform("Q8_0"))
    a4 = run.adapter_tensors(run.layout.uniform("Q4_0"))
    diffs = [np.abs(a8[n][0] - a4[n][0]).max() for n in a8]
    assert max(diffs) > 0, "the configuration-aware model must change lora_a with the configuration"
    assert all(np.array_equal(a8[n][1], a4[n][1]) for n in a8), "lora_b is shared"


def _llama_vs_torch(run: Run, cfg: Configuration, tmp_path, n_windows=4, n_ctx=64):
    model_path, adapter_path = tmp_path / "model.gguf", tmp_path / "adapter.gguf"
    write_gguf(run.loaded().gguf, model_path, cfg, quantized=run.quantized_bytes, progress=False)
    assert model_path.stat().st_size == run.layout.file_bytes(cfg)
    run.write_adapter(cfg, adapter_path)
    text = tiny_corpus(3000, seed=7)
    windows = evaluation.eval_windows(run.loaded().tokenizer, text, n_windows=n_windows, n_ctx=n_ctx)
    llm = llama_runtime.open_model(model_path, n_ctx=n_ctx)
    handle = llama_runtime.load_adapter(llm, adapter_path, model_path)
    llama_runtime.set_adapter(llm, handle)
    llama_logits = [llama_runtime.window_logits(llm, w) for w in windows]
    llama_nll = np.stack([evaluation.nll_from_logits(lg, w) for lg, w in zip(llama_logits, windows)])
    fn = run.torch_logits_fn(cfg)
    torch_logits = [fn(torch.tensor([w]))[0].numpy() for w in windows]
    torch_nll = evaluation.torch_window_nll(fn, windows)
    llama_runtime.set_adapter(llm, None)
    plain = llama_runtime.window_logits(llm, windows[0])
    llm.close()
    return llama_logits, torch_logits, llama_nll, torch_nll, plain


def test_f32_configuration_logits_match_llama_cpp(coa_run, tmp_path):
    run = Run.open(coa_run.path)
    cfg = Configuration({n: "F32" for n in run.layout.names()})
    ll, tl, _, _, plain = _llama_vs_torch(run, cfg, tmp_path, n_windows=2)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ll, tl))
    assert diff <= 1e-3, diff
    assert float(np.abs(plain - ll[0]).max()) > 10 * 1e-3, "the adapter must visibly change the logits"


def test_quantized_perplexity_matches_llama_cpp(coa_run, tmp_path):
    run = Run.open(coa_run.path)
    cfg = _mixed(run)
    _, _, llama_nll, torch_nll, _ = _llama_vs_torch(run, cfg, tmp_path)
    p_llama, p_torch = evaluation.perplexity(llama_nll), evaluation.perplexity(torch_nll)
    assert abs(p_llama / p_torch - 1) <= 0.005, (p_llama, p_torch)


def test_f16_embedding_of_the_embedding_menu(coa_run, tmp_path):
    """New runs let the token embedding / head take F16 (llama-quantize --token-embedding-type f16), and only it:
    the sensitivity table covers it, and torch predicts llama.cpp's perplexity of a file with it."""
    from toolkit.sensitivity import load_error_table

    run = Run.open(coa_run.path)
    emb = [t.name for t in run.layout.tensors if t.block < 0]
    assert emb and run.meta["layout"]["embedding_menu"] == ["F16"]
    assert all(run.layout.menu(n)[0].name == "F16" for n in emb)
    assert not any(q.name == "F16" for t in run.layout.tensors if t.block >= 0 for q in run.layout.menu(t.name))
    errors = load_error_table(run.path / "sensitivity.json", run.layout)
    assert errors is not None and all(errors[n]["F16"] < errors[n]["Q8_0"] for n in emb)
    cfg = Configuration({**run.layout.uniform("Q4_0").types, **{n: "F16" for n in emb}})
    run.layout.validate(cfg)
    _, _, llama_nll, torch_nll, _ = _llama_vs_torch(run, cfg, tmp_path)
    p_llama, p_torch = evaluation.perplexity(llama_nll), evaluation.perplexity(torch_nll)
    assert abs(p_llama / p_torch - 1) <= 0.005, (p_llama, p_torch)


def test_resume_matches_uninterrupted(tiny_model_dir, text_file, tmp_path):
    opts = TrainOptions(**{**FAST, "rounds": 1, "steps": 6, "checkpoint_every": 2})
    full = train(tmp_path / "full", tiny_model_dir, [text_file], opts, progress=False, log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", tiny_model_dir, [text_file], opts, progress=False, log=lambda s: None,
              interrupt_at=3)
    assert Run.open(tmp_path / "cut", require_trained=False).meta["step"] == 2
    resumed = train(tmp_path / "cut", None, [], opts, resume=True, progress=False, log=lambda s: None)
    a, b = full.model().lora_state(), resumed.model().lora_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shared_and_single_modes(tiny_model_dir, text_file, tmp_path):
    opts = TrainOptions(**{**FAST, "mode": "shared", "rounds": 1, "steps": 3})
    shared = train(tmp_path / "shared", tiny_model_dir, [text_file], opts, progress=False, log=lambda s: None)
    assert shared.model().cam is None
    cfg = shared.layout.uniform("Q4_0")
    single = train(tmp_path / "single", tiny_model_dir, [text_file], TrainOptions(**{**FAST, "mode": "single",
                   "rounds": 1, "steps": 3}), fixed_config=cfg, progress=False, log=lambda s: None)
    assert single.trainset() == [cfg]


def test_cli_adapter_gguf_and_peft(coa_run, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    _mixed(Run.open(coa_run.path)).save(cfg_path)
    assert main(["adapter", str(coa_run.path), "--config", str(cfg_path), "-o", str(tmp_path / "a.gguf"),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == (tmp_path / "a.gguf").stat().st_size
    assert main(["adapter", str(coa_run.path), "--config", "Q8_0", "-o", str(tmp_path / "peft"),
                 "--format", "peft"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == FAST.get("rank", 8)


def test_shared_lora_variant(coa_run, tmp_path, capsys):
    """The shared LoRA (no configuration-aware adjustment, no per-type correction) is the same pair for every
    configuration, in torch's loss and in the written file; `coalora adapter` writes it on --shared or on the
    configuration file's "adapter": "shared" (what a confirmed search found no worse)."""
    import gguf

    run = Run.open(coa_run.path)
    assert run.has_adjustments()
    mixed = _mixed(run)
    shared, generated = run.adapter_tensors(mixed, adjusted=False), run.adapter_tensors(mixed)
    f32 = run.adapter_tensors(run.layout.uniform("F32"))  # F32 tensors get no adjustment
    assert all(np.array_equal(shared[n][i], f32[n][i]) for n in shared for i in (0, 1))
    assert any(not np.array_equal(shared[n][0], generated[n][0]) for n in shared)
    with_cam, without = run.calibration_loss([mixed], 2), run.calibration_loss([mixed], 2, adjusted=False)
    assert with_cam != without and run.calibration_loss([mixed], 2) == with_cam, "the switch does not stick"
    ids = torch.randint(0, 100, (1, 16))
    assert torch.equal(run.torch_logits_fn(mixed)(ids), run.torch_logits_fn(mixed, adjusted=True)(ids))
    assert not torch.equal(run.torch_logits_fn(mixed)(ids), run.torch_logits_fn(mixed, adjusted=False)(ids))

    cfg_path = tmp_path / "cfg.json"
    mixed.save(cfg_path, extra={"adapter": "shared"})
    for args, kind in (([], "shared"), (["--generated"], "generated")):
        out = tmp_path / f"{kind}.gguf"
        assert main(["adapter", str(coa_run.path), "--config", str(cfg_path), "-o", str(out), "--json",
                     *args]) == 0
        assert json.loads(capsys.readouterr().out)["kind"] == kind
        written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
        want = shared if kind == "shared" else generated
        assert all(np.array_equal(written[f"{n}.lora_a"].reshape(want[n][0].shape), want[n][0]) for n in want)
    mixed.save(cfg_path, extra={"adapter": "fancy"})
    assert main(["adapter", str(coa_run.path), "--config", str(cfg_path), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert '"adapter" must be' in err and err.count("\n") == 1 and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("bad, message", [
    ({"types": {"blk.99.attn_q.weight": "Q8_0"}}, "unknown tensor"),
    ({"types": "Q8_0"}, "configuration is a JSON object"),
])
def test_cli_adapter_bad_configuration(coa_run, tmp_path, capsys, bad, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    out = tmp_path / "a.gguf"
    assert main(["adapter", str(coa_run.path), "--config", str(p), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_adapter_type_outside_menu(coa_run, tmp_path, capsys):
    run = Run.open(coa_run.path)
    cfg = run.layout.uniform("Q8_0").to_json()
    name = next(t.name for t in run.layout.tensors if t.block >= 0)
    cfg["types"][name] = "F16"  # fits the rows, but only the embedding's menu has it
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    assert main(["adapter", str(coa_run.path), "--config", str(p), "-o", str(tmp_path / "a.gguf")]) == 1
    assert "not in its menu" in capsys.readouterr().err


def test_cli_adapter_other_model_refused(coa_run, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("not a model")
    assert main(["adapter", str(coa_run.path), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf"),
                 "--model", str(other)]) == 1
    assert "not the model" in capsys.readouterr().err


def test_cli_train_errors(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["train", str(tiny_model_dir), "--data", str(short), "-o", str(tmp_path / "r")]) == 1
    assert "too short" in capsys.readouterr().err
    assert main(["train", str(tiny_model_dir), "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "r")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["adapter", str(tmp_path), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert "not a coalora run" in capsys.readouterr().err
    for opt, message in ((["--menu", "Q9"], "unknown quant type 'Q9'"), (["--type-deltas", "Q9"], "unknown quant type"),
                         (["--menu", "Q8_0,Q4_0", "--type-deltas", "Q5_0"], "--type-deltas Q5_0: not in --menu"),
                         (["--mode", "shared", "--type-deltas", "all"], "--type-deltas needs --mode coa")):
        assert main(["train", str(tiny_model_dir), "-o", str(tmp_path / "r"), *opt]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_corrupt_checkpoint(coa_run, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(coa_run.path, broken)
    (broken / "checkpoint.safetensors").write_bytes(b"garbage")
    assert main(["adapter", str(broken), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert "corrupt" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a file: proof that code ran."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_never_runs(coa_run, tmp_path, capsys):
    """A run folder whose checkpoint is a pickle (as older coalora wrote, or as an attacker crafts) is refused
    by every command that reads checkpoints, and its code does not run."""
    import pickle
    import shutil
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(coa_run.path, evil)
    (evil / "checkpoint.safetensors").unlink()
    (evil / "checkpoint.pt").write_bytes(pickle.dumps({"lora": _Payload(marker), "step": 1}))
    for argv in (["adapter", str(evil), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")],
                 ["emit", str(evil), "--profile", "rpi4-4gb", "-o", str(tmp_path / "dist")],
                 ["train", "unused", "-o", str(evil), "--resume", "--steps", "9"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "checkpoint.pt from an older coalora" in err and err.count("\n") == 1, err
    assert not marker.exists()
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "dist").exists()


def test_nan_checkpoint_refused(coa_run, tmp_path, capsys):
    import shutil
    from toolkit.run import load_checkpoint, save_checkpoint
    bad = tmp_path / "nan"
    shutil.copytree(coa_run.path, bad)
    state = load_checkpoint(bad / "checkpoint.safetensors")
    state["lora"] = {k: torch.full_like(v, float("nan")) for k, v in state["lora"].items()}
    save_checkpoint(bad / "checkpoint.safetensors", state)
    assert main(["adapter", str(bad), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()


def test_device_names_are_checked():
    from converters.errors import CoaloraError
    from toolkit.run import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CoaloraError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CoaloraError, match="sees no CUDA"):
            resolve_device("cuda")


def test_search_confirm_reports_each_candidates_adapter(coa_run, capsys):
    """`coalora search --confirm` prints what the confirmation compared, each candidate with the adapter it keeps,
    and its JSON holds both losses of every candidate."""
    from toolkit.cli import main

    run = Run.open(coa_run.path)
    budget = str(run.layout.file_bytes(run.layout.uniform("Q8_0")))
    args = ["search", str(coa_run.path), "--budget-bytes", budget, "--confirm", "1", "--confirm-windows", "2"]
    assert main([*args, "--json"]) == 0
    conf = json.loads(capsys.readouterr().out)["confirmation"]
    assert conf["windows"] in (2, 4) and sum(c["picked"] for c in conf["candidates"]) == 1  # 4: extended once
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "adapter" in out and f"confirmation on {conf['windows']} held-out windows" in out and "shared LoRA:" in out
    for c in conf["candidates"]:
        assert c["adapter"] in ("generated", "shared")
        assert c["measured_loss"] == pytest.approx(c["generated_loss" if c["adapter"] == "generated" else "shared_loss"])


def test_calibration_losses_are_measured_once_per_checkpoint(coa_run, monkeypatch):
    """emit's confirmations for several profiles measure the same candidates: each configuration and variant is
    measured once per checkpoint, and again after the checkpoint is rewritten (training does so every round)."""
    import shutil

    run = Run.open(coa_run.path)
    measured = []
    real = run._measure_calibration
    monkeypatch.setattr(run, "_measure_calibration", lambda cfgs, *a: measured.extend(cfgs) or real(cfgs, *a))
    mixed, q8 = _mixed(run), run.layout.uniform("Q8_0")
    first = run.calibration_loss([mixed, q8, mixed], 2, per_window=True)
    again = run.calibration_loss([q8, mixed], 2, per_window=True)
    shared = run.calibration_loss([mixed], 2, adjusted=False)
    assert measured == [mixed, q8, mixed] and np.array_equal(first[0], again[1]) and np.array_equal(first[1], again[0])
    assert shared[0] != float(first[0].mean())
    again[0][:] = 0.0  # callers get copies
    assert run.calibration_loss([q8], 2) == [float(first[1].mean())] and len(measured) == 3
    copy = run.checkpoint_path.with_suffix(".copy")
    shutil.copy2(run.checkpoint_path, copy)
    copy.replace(run.checkpoint_path)  # a new file with the same bytes: measured again, to the same losses
    assert np.array_equal(run.calibration_loss([q8], 2, per_window=True)[0], first[1]) and measured[-1] == q8
    n = len(measured)
    run.forget_measurements()  # bench/search.py times each method on its own measurements
    run.calibration_loss([q8], 2)
    assert len(measured) == n + 1


def test_calibration_divergence_from_the_unquantized_model(coa_run, monkeypatch):
    """The fidelity measure: each window's KL divergence, with the shared LoRA or the generated adapter, from the
    F32 model with the shared LoRA: zero for F32 with the shared LoRA, larger for fewer bits, equal to a direct
    computation, measured in the passes of the loss with the same adapter (no extra pass for a loss already asked
    for, and the same losses)."""
    import torch
    from torch.nn import functional as F

    from toolkit.training import calibration_stream

    run = Run.open(coa_run.path)
    passes = []
    real = run._measure_calibration
    monkeypatch.setattr(run, "_measure_calibration", lambda cfgs, *a: passes.append(list(cfgs)) or real(cfgs, *a))
    f32, q8, q4 = (run.layout.uniform(t) for t in ("F32", "Q8_0", "Q4_0"))
    kl = run.calibration_divergence([f32, q8, q4], 3)
    assert all(len(k) == 3 for k in kl) and np.allclose(kl[0], 0.0, atol=1e-6)
    assert 0 < kl[1].mean() < kl[2].mean()
    loss = run.calibration_loss([q4], 3, per_window=True, adjusted=False)[0]
    assert len(passes) == 1  # the shared-LoRA losses came with the divergences
    model = run.model()
    batch, _ = calibration_stream(run).labelled_calibration(3)
    with torch.no_grad(), model.variant(False):
        model.set_configuration(f32)
        ref = F.log_softmax(model(batch).logits[:, :-1].float(), -1)
        model.set_configuration(q4)
        lp = F.log_softmax(model(batch).logits[:, :-1].float(), -1)
    direct = (ref.exp() * (ref - lp)).sum(-1).mean(1).double().numpy()
    nll = -lp.gather(-1, batch[:, 1:, None])[..., 0].mean(1).double().numpy()
    assert np.allclose(kl[2], direct, rtol=1e-4, atol=1e-7) and np.allclose(loss, nll, rtol=1e-5)
    # with the generated adapter: from the same reference (F32 with the shared LoRA), in the generated losses' pass
    n = len(passes)
    kl_generated = run.calibration_divergence([q4], 3, adjusted=True)[0]
    generated = run.calibration_loss([q4], 3, per_window=True)[0]
    assert len(passes) == n + 1
    with torch.no_grad(), model.variant(True):
        model.set_configuration(q4)
        lp = F.log_softmax(model(batch).logits[:, :-1].float(), -1)
    direct = (ref.exp() * (ref - lp)).sum(-1).mean(1).double().numpy()
    nll = -lp.gather(-1, batch[:, 1:, None])[..., 0].mean(1).double().numpy()
    assert np.allclose(kl_generated, direct, rtol=1e-4, atol=1e-7) and np.allclose(generated, nll, rtol=1e-5)
    assert not np.allclose(kl_generated, kl[2])  # the adjustment moves the model


def test_calibration_loss_without_divergence_skips_the_unquantized_pass(coa_run, monkeypatch):
    """Training's search rounds rank by loss alone: without the divergence no F32 reference pass runs, the losses
    are the same, a divergence asked for later measures its spans again (with the reference), and a divergence
    measured before is kept when its span is measured again without it. Passes of 2 windows here."""
    import toolkit.run as run_module

    monkeypatch.setattr(run_module, "CALIBRATION_BATCH", 2)
    run = Run.open(coa_run.path)
    model = run.model()
    configured = []
    real_set = model.set_configuration
    monkeypatch.setattr(model, "set_configuration", lambda c: configured.append(c) or real_set(c))
    f32, q4, q8 = (run.layout.uniform(t) for t in ("F32", "Q4_0", "Q8_0"))
    loss_only = run.calibration_loss([q4], 6, per_window=True, divergence=False)[0]
    assert f32 not in configured
    kl = run.calibration_divergence([q4], 6, adjusted=True)[0]
    assert f32 in configured and len(kl) == 6 and kl.mean() > 0
    assert np.array_equal(run.calibration_loss([q4], 6, per_window=True)[0], loss_only)
    run.forget_measurements()
    kl8 = run.calibration_divergence([q8], 4, adjusted=True)[0]  # spans (0, 2) and (2, 2), with divergence
    n = len(configured)
    # q4 lacks every span, q8 the third: both are measured on all three, without the reference
    both = run.calibration_loss([q4, q8], 6, per_window=True, divergence=False)
    assert f32 not in configured[n:] and np.array_equal(both[0], loss_only)
    n = len(configured)
    assert np.array_equal(run.calibration_divergence([q8], 4, adjusted=True)[0], kl8) and len(configured) == n


def test_more_calibration_windows_measure_only_the_added_ones(coa_run, monkeypatch):
    """The confirmation's extension to more windows measures only the windows it adds, and its losses are bit for
    bit those of a measurement from scratch (the same forward passes). Passes of 2 windows here: the fixture's
    held-out tail has 8."""
    import toolkit.run as run_module

    monkeypatch.setattr(run_module, "CALIBRATION_BATCH", 2)
    run = Run.open(coa_run.path)
    spans = []
    real = run._measure_calibration
    monkeypatch.setattr(run, "_measure_calibration", lambda cfgs, sp, *a: spans.append(list(sp)) or real(cfgs, sp, *a))
    mixed = _mixed(run)
    first = run.calibration_loss([mixed], 4, per_window=True)[0]
    more = run.calibration_loss([mixed], 7, per_window=True)[0]
    assert spans == [[(0, 2), (2, 2)], [(4, 2), (6, 1)]] and len(more) == 7 and np.array_equal(more[:4], first)
    fresh = Run.open(coa_run.path).calibration_loss([mixed], 7, per_window=True)[0]
    assert np.array_equal(more, fresh)
    run.calibration_loss([mixed], 3)  # its last pass (1 window) is another one: measured, not cut from (2, 2)
    assert spans[-1] == [(2, 1)]
    assert run.calibration_loss([mixed], 100, per_window=True)[0].shape == (8,)  # at most the held-out windows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(tiny_model_dir, text_file, tmp_path):
    """The GPU path trains the same model: same losses, and its adapters agree with llama.cpp on the CPU."""
    opts = dict(FAST, steps=4, rounds=1)
    runs = {d: train(tmp_path / d, tiny_model_dir, [text_file], TrainOptions(**opts, device=d), progress=False,
                     log=lambda s: None) for d in ("cpu", "cuda")}
    assert runs["cuda"].meta["device"].startswith("cuda")
    assert runs["cuda"].meta["final_loss"] == pytest.approx(runs["cpu"].meta["final_loss"], rel=1e-3)
    cfg = runs["cpu"].layout.uniform("Q4_0")  # both adapters, scored on the CPU, do equally well
    losses = [Run.open(runs[d].path).calibration_loss([cfg])[0] for d in ("cpu", "cuda")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_step_configuration_sampling():
    trainset = [f"cfg{i}" for i in range(6)]
    bpw = {c: float(i) for i, c in enumerate(trainset)}.__getitem__
    opts = TrainOptions(seed=0)
    picks = [opts.pick(trainset, bpw, s) for s in range(40)]
    assert len(set(picks)) > 3, "uniform over the training set"
    assert picks == [opts.pick(trainset, bpw, s) for s in range(40)], "reproducible from (seed, step)"
    assert any(opts.pick(trainset, bpw, s, 1) != picks[s] for s in range(40)), "each share of a batch draws anew"
    top = TrainOptions(seed=0, top_share=1.0)
    assert {top.pick(trainset, bpw, s) for s in range(10)} == {"cfg5"}
    low = TrainOptions(seed=0, low_share=1.0)
    assert {low.pick(trainset, bpw, s) for s in range(40)} == {"cfg0", "cfg1", "cfg2"}, "the lower-bpw half"
    odd = trainset[:5]
    assert {low.pick(odd, bpw, s) for s in range(40)} == {"cfg0", "cfg1", "cfg2"}, "ceil(n/2) of an odd set"
    half = TrainOptions(seed=0, low_share=0.5)
    lows = sum(half.pick(trainset, bpw, s) in ("cfg0", "cfg1", "cfg2") for s in range(400))
    assert 260 < lows < 340, "P(low half) = 0.5 + 0.5 * 3/6"


@pytest.mark.parametrize("config_batch", ["split", "full"])
def test_configs_per_step_trains_and_is_frozen(tiny_model_dir, text_file, tmp_path, config_batch):
    from converters.errors import CoaloraError

    opts = dict(FAST, steps=2, rounds=1, checkpoint_every=1)
    run = train(tmp_path / "c2", tiny_model_dir, [text_file],
                TrainOptions(**opts, configs_per_step=2, config_batch=config_batch), progress=False,
                log=lambda s: None)
    o = run.meta["options"]
    assert run.meta["status"] == "trained" and (o["configs_per_step"], o["config_batch"]) == (2, config_batch)
    with pytest.raises(CoaloraError, match="configs_per_step"):
        train(tmp_path / "c2", None, [], TrainOptions(**dict(opts, steps=3)), resume=True, progress=False,
              log=lambda s: None)


def test_init_lora_starts_from_a_trained_run(tiny_model_dir, text_file, tmp_path):
    from converters.errors import CoaloraError
    from toolkit.run import load_checkpoint

    opts = dict(FAST, steps=2, rounds=1, checkpoint_every=2)
    src = train(tmp_path / "src", tiny_model_dir, [text_file], TrainOptions(**dict(opts, mode="shared")),
                progress=False, log=lambda s: None)
    run = train(tmp_path / "coa", tiny_model_dir, [text_file], TrainOptions(**dict(opts, steps=0),
                init_lora=str(src.path)), progress=False, log=lambda s: None)
    a, b = (load_checkpoint(r.checkpoint_path)["lora"] for r in (src, run))
    lora_keys = [k for k in a if k.startswith("layers.")]
    assert lora_keys and all(torch.equal(a[k], b[k]) for k in lora_keys), "the LoRA is copied as is"
    assert any(k.startswith("cam.") for k in b), "the configuration-aware model starts fresh"
    with pytest.raises(CoaloraError, match="does not match"):
        train(tmp_path / "r4", tiny_model_dir, [text_file], TrainOptions(**dict(opts, rank=4), init_lora=str(src.path)),
              progress=False, log=lambda s: None)
    with pytest.raises(CoaloraError, match="no trained run"):
        train(tmp_path / "none", tiny_model_dir, [text_file], TrainOptions(**opts, init_lora=str(tmp_path)),
              progress=False, log=lambda s: None)


@pytest.mark.parametrize("anchor_loss, weight", [("kl", 0.0), ("ce", 1.0)])
def test_anchor_configuration_trains(tiny_model_dir, text_file, tmp_path, anchor_loss, weight):
    from converters.errors import CoaloraError
    from toolkit.run import load_checkpoint
    from toolkit.training import _kl

    opts = dict(FAST, steps=2, rounds=1, checkpoint_every=2)
    run = train(tmp_path / "a", tiny_model_dir, [text_file],
                TrainOptions(**opts, anchor="F32", anchor_loss=anchor_loss, anchor_lora_weight=weight),
                progress=False, log=lambda s: None)
    plain = train(tmp_path / "p", tiny_model_dir, [text_file], TrainOptions(**opts), progress=False, log=lambda s: None)
    a, p = (load_checkpoint(r.checkpoint_path)["lora"] for r in (run, plain))
    assert run.meta["options"]["anchor"] == "F32"
    assert run.meta["final_loss_kind"] == ("kl" if anchor_loss == "kl" else "cross-entropy")
    assert run.meta["final_anchor_loss"] > 0 and "final_anchor_loss" not in plain.meta
    assert any(not torch.equal(a[k], p[k]) for k in a if k.startswith("layers.")), "the anchor changes the training"
    with pytest.raises(CoaloraError, match="anchor"):
        train(tmp_path / "a", None, [], TrainOptions(**dict(opts, steps=3)), resume=True, progress=False,
              log=lambda s: None)
    with pytest.raises(CoaloraError, match="--anchor Q9"):
        train(tmp_path / "bad", tiny_model_dir, [text_file], TrainOptions(**opts, anchor="Q9"), progress=False,
              log=lambda s: None)
    logits = torch.randn(2, 3, 5)
    assert float(_kl(torch.log_softmax(logits, -1), logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(_kl(torch.log_softmax(logits, -1), logits.flip(-1))) > 0


def test_anchor_weight_zero_trains_the_full_precision_lora(tiny_model_dir, text_file, tmp_path):
    """With --anchor F32 --anchor-lora-weight 0 the LoRA is bit for bit the one fine-tuned on the F32 model (the
    F32 anchor gets no adjustment, and the LoRA's gradient is clipped apart from the CAM's and corrections')."""
    opts = dict(FAST, steps=4, rounds=2, checkpoint_every=4)
    coa = train(tmp_path / "c", tiny_model_dir, [text_file],
                TrainOptions(**opts, anchor="F32", anchor_lora_weight=0.0, type_deltas=("Q4_0", "Q8_0")),
                progress=False, log=lambda s: None)
    f32 = coa.layout.uniform("F32")
    fp = train(tmp_path / "f", tiny_model_dir, [text_file], TrainOptions(**dict(opts, mode="single", rounds=1)),
               fixed_config=f32, progress=False, log=lambda s: None)
    c, f = coa.model().lora_state(), fp.model().lora_state()
    lora = [k for k in f if ".lora_" in k]
    assert lora and all(torch.equal(c[k], f[k]) for k in lora)
    assert c["cam.mlp.4.weight"].abs().max() > 0, "the CAM trained (its last layer starts at zero)"
    a, b = coa.model().adapter_tensors(f32), fp.model().adapter_tensors(f32)
    assert all(np.array_equal(a[n][i], b[n][i]) for n in a for i in (0, 1)), "the F32 adapter is the plain LoRA"


def test_type_deltas_train_and_match_llama_cpp(tiny_model_dir, text_file, tmp_path):
    from converters.configuration import DEFAULT_MENU
    from converters.errors import CoaloraError
    from toolkit.run import load_checkpoint

    opts = dict(FAST, steps=4, rounds=1, checkpoint_every=4)
    types = tuple(t for t in DEFAULT_MENU if t != "Q8_0")
    run = train(tmp_path / "d", tiny_model_dir, [text_file], TrainOptions(**opts, type_deltas=types, delta_lr=2e-2),
                progress=False, log=lambda s: None)
    state = load_checkpoint(run.checkpoint_path)["lora"]
    deltas = {k: v for k, v in state.items() if ".delta_A" in k or ".delta_B" in k}
    run = Run.open(run.path)
    model = run.model()
    assert len(deltas) == 2 * sum(len([q for q in run.layout.menu(n) if q.name in types]) for n in model.lora_names)
    assert not any(".Q8_0" in k for k in deltas)
    # each correction's scale: (RMS ggml error of its type / Q4_0's) ** power (the table's errors are squared)
    errors, power = training.sensitivity_errors(run), run.meta["options"]["delta_error_power"]
    name0 = model.lora_names[0]
    scale = f"layers.{name0.replace('.', '_')}.delta_scale_"  # checkpoint keys of its scales
    assert power == 0.5 and float(state[scale + "Q5_0"]) < 1
    for q in model.layer(name0).delta_A:
        assert float(state[scale + q]) == pytest.approx((errors[name0][q] / errors[name0]["Q4_0"]) ** (power / 2),
                                                        rel=1e-5)
    assert float(state[scale + "Q4_0"]) == pytest.approx(1.0)
    assert any(v.abs().max() > 0 for v in deltas.values()), "the drawn types' corrections train"
    q8 = run.layout.uniform("Q8_0")
    a8 = run.adapter_tensors(q8)
    assert all(np.array_equal(a8[n][1], model.loaded.permute_rows(n, model.layer(n).lora_B.detach().numpy()))
               for n in a8), "a type without corrections uses the shared B"
    # a tensor whose correction for some type trained: switching that tensor to the type changes its B
    name, q = next((n, q) for n in model.lora_names for q, d in model.layer(n).delta_B.items() if d.abs().max() > 0)
    other = run.adapter_tensors(Configuration({**{k: t.name for k, t in q8.types.items()}, name: q}))
    assert not np.array_equal(a8[name][1], other[name][1]), "lora_b follows the tensor's type"
    _, _, llama_nll, torch_nll, _ = _llama_vs_torch(run, _mixed(run), tmp_path)
    assert abs(evaluation.perplexity(llama_nll) / evaluation.perplexity(torch_nll) - 1) <= 0.005
    with pytest.raises(CoaloraError, match="type_deltas"):
        train(tmp_path / "d", None, [], TrainOptions(**dict(opts, steps=6)), resume=True, progress=False,
              log=lambda s: None)


def test_missing_checkpoint_refused(coa_run, tmp_path, capsys):
    import shutil
    gone = tmp_path / "gone"
    shutil.copytree(coa_run.path, gone)
    (gone / "checkpoint.safetensors").unlink()
    assert main(["adapter", str(gone), "--config", "Q8_0", "-o", str(tmp_path / "a.gguf")]) == 1
    assert "checkpoint.safetensors is missing" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()
