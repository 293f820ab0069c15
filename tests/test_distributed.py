"""Data-parallel training under torchrun (gloo on the CPU, one thread per rank) on the tiny model: two ranks equal
one process with two configurations per step, a two-rank checkpoint resumes on one rank, bad launches stop every
rank with one message and write nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_corpus
from converters.errors import CoaloraError
from toolkit.run import Run
from toolkit.training import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
# COALORA_TEST_DEVICE=cuda (bench/gpu_check.sh): the same tests on GPUs, NCCL between two of them
DEVICE = os.environ.get("COALORA_TEST_DEVICE", "cpu")
FAST = dict(steps=4, seq_len=32, batch=4, lr=1e-2, cam_lr=1e-2, rounds=2, search_candidates=4, checkpoint_every=2,
            device=DEVICE, imatrix="")

# Each rank runs the CLI with its arguments; "@A,B" means A on rank 0 and B on rank 1 (to make ranks disagree).
# It records its exit status in RC_DIR/rc<rank>.
LAUNCHER = """
import os, sys
from toolkit.cli import main
rank = int(os.environ["RANK"])
args = [a[1:].split(",")[rank] if a.startswith("@") else a for a in sys.argv[1:]]
code = main(args)
with open(os.path.join(os.environ["RC_DIR"], f"rc{rank}"), "w") as f:
    f.write(str(code))
sys.exit(code)
"""


def _cli_args(opts: dict) -> list[str]:
    """The command line of ``opts``, with the plain recipe (TrainOptions' defaults, as the one-process runs)."""
    args = [a for k, v in opts.items() if k != "imatrix" for a in (f"--{k.replace('_', '-')}", str(v))]
    return [*args, "--recipe", "plain", *(["--no-imatrix"] if opts.get("imatrix") == "" else [])]


def torchrun(tmp_path: Path, args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N`` (a free rendezvous port) of the CLI."""
    if DEVICE.startswith("cuda") and torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} ranks with NCCL need {nproc} GPUs")
    script = tmp_path / "launch_coalora.py"
    script.write_text(LAUNCHER)
    rc_dir = tmp_path / f"rc-{len(list(tmp_path.glob('rc-*')))}"
    rc_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "COALORA_THREADS": "1", "RC_DIR": str(rc_dir), "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(nproc), str(script), *map(str, args)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    res.rank_codes = sorted((p.name, p.read_text()) for p in rc_dir.iterdir())
    return res


def _failure(res) -> str:
    """What a failed launch tells: the exit status each rank recorded after ``main`` returned (none: it died
    before), the ranks' own stderr (before torchrun's report of the failure) and the end of it."""
    own = res.stderr.split("ChildFailedError")[0]
    return f"ranks finished main with {res.rank_codes}\n{own[:3000]}\n...\n{res.stderr[-2000:]}"


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("dp-text") / "train.txt"
    p.write_text(tiny_corpus(6000, seed=1))
    return p


@pytest.fixture(scope="module")
def two_rank_run(tiny_model_dir, text_file, tmp_path_factory):
    """A CoA-LoRA run trained by two ranks (one configuration each per step, a search round half-way)."""
    tmp = tmp_path_factory.mktemp("dp")
    res = torchrun(tmp, ["train", tiny_model_dir, "--data", text_file, "-o", tmp / "run", "--json", *_cli_args(FAST)])
    assert res.returncode == 0, _failure(res)
    assert res.rank_codes == [("rc0", "0"), ("rc1", "0")]
    assert json.loads(res.stdout[res.stdout.index("{"):])["steps"] == FAST["steps"]  # rank 0 alone reports
    return Run.open(tmp / "run")


def test_two_ranks_equal_one_process_with_two_configurations(two_rank_run, tiny_model_dir, text_file, tmp_path):
    one = train(tmp_path / "one", tiny_model_dir, [text_file], TrainOptions(**FAST, configs_per_step=2),
                progress=False, log=lambda s: None)
    assert two_rank_run.meta["world_size"] == 2 and one.meta["world_size"] == 1
    assert two_rank_run.meta["options"] == one.meta["options"]  # configs_per_step 2: the step's total
    assert json.loads(two_rank_run.trainset_path.read_text()) == json.loads(one.trainset_path.read_text())
    diff = max_relative_difference(two_rank_run.model().lora_state(), one.model().lora_state())
    assert diff <= 1e-4, diff
    assert abs(two_rank_run.meta["final_loss"] - one.meta["final_loss"]) <= 1e-4 * one.meta["final_loss"]


def test_two_rank_checkpoint_resumes_on_one_rank(tiny_model_dir, text_file, tmp_path):
    opts = dict(FAST, mode="shared", steps=3)
    res = torchrun(tmp_path, ["train", tiny_model_dir, "--data", text_file, "-o", tmp_path / "two", "--json",
                              *_cli_args(opts)])
    assert res.returncode == 0, _failure(res)
    more = TrainOptions(**dict(opts, steps=6), configs_per_step=2)
    with pytest.raises(CoaloraError, match="trains 2 configurations per step .* pass --configs-per-step 2"):
        train(tmp_path / "two", None, [], TrainOptions(**dict(opts, steps=6)), resume=True, progress=False,
              log=lambda s: None)
    resumed = train(tmp_path / "two", None, [], more, resume=True, progress=False, log=lambda s: None)
    # the same run in one process all along: 3 steps, then resumed to 6
    train(tmp_path / "one", tiny_model_dir, [text_file], TrainOptions(**opts, configs_per_step=2), progress=False,
          log=lambda s: None)
    reference = train(tmp_path / "one", None, [], more, resume=True, progress=False, log=lambda s: None)
    assert resumed.meta["world_size"] == 1 and resumed.meta["step"] == 6
    diff = max_relative_difference(resumed.model().lora_state(), reference.model().lora_state())
    assert diff <= 1e-4, diff


def _fails_once(res, message: str) -> None:
    assert res.returncode != 0
    assert res.rank_codes == [("rc0", "1"), ("rc1", "1")], (res.rank_codes, res.stderr[-3000:])
    lines = [line for line in res.stderr.splitlines() if "coalora: error:" in line]
    assert len(lines) == 1 and message in lines[0], res.stderr[-3000:]
    assert "toolkit/" not in res.stderr, "no traceback of coalora's own code"


def test_world_size_not_dividing_the_batch(tiny_model_dir, text_file, tmp_path):
    res = torchrun(tmp_path, ["train", tiny_model_dir, "--data", text_file, "-o", tmp_path / "r",
                              *_cli_args(dict(FAST, batch=3))])
    _fails_once(res, "--batch 3 is not divisible by the world size 2")
    assert not (tmp_path / "r").exists()


def test_ranks_with_different_data_or_options(tiny_model_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus(6000, seed=2))
    res = torchrun(tmp_path, ["train", tiny_model_dir, "--data", f"@{text_file},{other}", "-o", tmp_path / "r",
                              *_cli_args(dict(FAST, lr="@0.01,0.02"))])
    _fails_once(res, "rank 1 of 2 was started with different data, options than rank 0")
    assert not (tmp_path / "r").exists()


def test_resume_of_a_run_trained_on_another_model(two_rank_run, tiny_model_dir, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "initializer_range": 0.05}))  # another fingerprint
    run = tmp_path / "run"
    shutil.copytree(two_rank_run.path, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = torchrun(tmp_path, ["train", other, "-o", run, "--resume", *_cli_args(dict(FAST, steps=6))])
    _fails_once(res, "is not the model run")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_memory_options_activation_checkpointing_and_16_bit_weights(tiny_model_dir, text_file, tmp_path):
    """Activation checkpointing recomputes exactly (same LoRA); bfloat16 weights halve the bank and train to
    about the same loss; the memory plan is printed and checked against the device."""
    opts = dict(FAST, steps=3, mode="shared")
    logs: dict[str, list] = {}
    runs = {}
    for name, extra in (("plain", {}), ("ckpt", dict(activation_checkpointing=True)),
                        ("bf16", dict(weights_dtype="bfloat16"))):
        logs[name] = []
        runs[name] = train(tmp_path / name, tiny_model_dir, [text_file], TrainOptions(**opts, **extra),
                           progress=False, log=logs[name].append)
    base = runs["ckpt"].model().base  # the attribute's name before transformers renamed it: is_gradient_checkpointing
    assert getattr(base, "is_activation_checkpointing", getattr(base, "is_gradient_checkpointing", False))
    assert max_relative_difference(runs["ckpt"].model().lora_state(), runs["plain"].model().lora_state()) <= 1e-5
    assert {t.dtype for t in runs["bf16"].bank()._deq.values()} == {torch.bfloat16}
    assert abs(runs["bf16"].meta["final_loss"] / runs["plain"].meta["final_loss"] - 1) < 0.01
    plan = next(s for s in logs["plain"] if s.startswith("memory plan on"))
    assert "activations, estimated" in plan and "(checkpointed)" in next(s for s in logs["ckpt"] if "memory plan" in s)
    assert "weights (bfloat16" in next(s for s in logs["bf16"] if "memory plan" in s)


def test_memory_plan_refuses_what_the_device_cannot_hold():
    from toolkit import memory_plan

    shape = memory_plan.ModelShape.llama(16, 2048, 8192, 128256, 32, 8, tied=True)  # Llama 3.2 1B
    assert 1.2e9 < shape.n_quantized + shape.n_other < 1.3e9
    args = dict(trainable=11_000_000, sequences=4, seq_len=2048, weights_dtype="float32", checkpointing=False,
                bank_wanted=8 << 30, device="cuda:0")
    full = memory_plan.plan(shape, **args, available=None)
    ckpt = memory_plan.plan(shape, **dict(args, checkpointing=True), available=None)
    assert ckpt.activations < full.activations / 4
    half = memory_plan.plan(shape, **dict(args, weights_dtype="bfloat16"), available=None)
    assert half.weights < 0.55 * full.weights
    small = memory_plan.plan(shape, **args, available=full.needed - 1)
    assert small.bank == 0
    with pytest.raises(CoaloraError, match="--activation-checkpointing"):
        small.check()
    roomy = memory_plan.plan(shape, **args, available=2 * full.needed + (8 << 30))
    roomy.check()
    assert roomy.bank == 8 << 30  # everything the training set uses fits


@pytest.mark.parametrize("world, local_rank, current, expected", [(1, 0, 1, 1), (2, 3, 0, 1)])
def test_bare_cuda_device_gets_an_index(monkeypatch, world, local_rank, current, expected):
    """torch.cuda.set_device refuses a bare ``cuda``: one process takes the current GPU, a rank its local one."""
    from toolkit.distributed import Group

    seen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(d))
    got = Group(world=world, rank=local_rank, local_rank=local_rank).device(torch.device("cuda"))
    assert got == torch.device("cuda", expected) and seen == [got]
    assert Group().device(torch.device("cpu")) == torch.device("cpu") and len(seen) == 1
