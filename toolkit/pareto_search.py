"""Pareto-based configuration search (CoA-LoRA §3.3): which configurations to train the adapter on.

Two objectives, both minimized: bits per weight (known exactly for any configuration, so it is
computed, not modelled) and the calibration loss of the configuration-aware adapter (modelled by a
BoTorch ``SingleTaskGP`` on a compact encoding of the configuration). Each round proposes ``n_new``
configurations from a discrete candidate pool by sequential greedy maximization of
``qLogExpectedHypervolumeImprovement`` (kriging believer: a picked candidate joins the front at its
predicted loss), evaluates them for real, archives them, and returns the new training set: the
non-dominated configurations within each 0.25-bit bin.

Hypervolume reference point (minimize-both space): bpw = the largest archived bpw + one bin width,
loss = the largest archived loss + 10% of the archived loss range (see :func:`reference_point`).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from converters.quant_types import get
from converters.configuration import Configuration, ModelLayout
from converters.errors import CoaloraError
from converters.fileio import atomic_path, write_json

BIN_WIDTH = 0.25
Evaluate = Callable[[list[Configuration]], list[float]]


# ---------------------------------------------------------------- archive


@dataclass
class Record:
    types: dict[str, str]
    file_bytes: int
    bpw: float
    loss: float
    round: int = 0

    def config(self) -> Configuration:
        return Configuration(self.types)


@dataclass
class Archive:
    """Every configuration evaluated so far, with its exact size and its real loss."""
    records: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def configs(self) -> list[Configuration]:
        return [r.config() for r in self.records]

    def keys(self) -> set:
        return {r.config().key() for r in self.records}

    def points(self) -> np.ndarray:
        """(n, 2) array of (bpw, loss)."""
        return np.array([[r.bpw, r.loss] for r in self.records], dtype=float).reshape(-1, 2)

    @property
    def next_round(self) -> int:
        return 1 + max((r.round for r in self.records), default=-1)

    def add(self, layout: ModelLayout, cfgs: Sequence[Configuration], losses: Sequence[float],
            round: int | None = None) -> None:
        if len(cfgs) != len(losses):
            raise CoaloraError(f"evaluate returned {len(losses)} losses for {len(cfgs)} configurations")
        rnd = self.next_round if round is None else round
        for c, l in zip(cfgs, losses):
            if not math.isfinite(float(l)):
                raise CoaloraError(f"evaluate returned a non-finite loss ({l})")
            self.records.append(Record({n: q.name for n, q in c.types.items()}, layout.file_bytes(c),
                                       layout.bits_per_weight(c), float(l), rnd))

    def save(self, path) -> None:
        write_json(path, {"version": 1, "records": [asdict(r) for r in self.records]})

    @classmethod
    def load(cls, path, layout: ModelLayout | None = None) -> "Archive":
        """The archive at ``path``, every record checked (and, given the run's ``layout``, every configuration
        checked against it): a damaged archive is a one-line error, never a search on garbage."""
        from converters.fileio import read_json

        d = read_json(path)
        records = d.get("records") if isinstance(d, dict) else None
        if not isinstance(records, list):
            raise CoaloraError(f"archive {path} has no list of records")
        out = []
        for i, r in enumerate(records):
            ok = (isinstance(r, dict) and set(r) <= {"types", "file_bytes", "bpw", "loss", "round"}
                  and {"types", "file_bytes", "bpw", "loss"} <= set(r)
                  and isinstance(r["file_bytes"], int) and not isinstance(r["file_bytes"], bool) and r["file_bytes"] >= 0
                  and all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) and math.isfinite(r[k])
                          for k in ("bpw", "loss"))
                  and isinstance(r.get("round", 0), int) and not isinstance(r.get("round", 0), bool))
            if not ok:
                raise CoaloraError(f"archive {path}: record {i} is damaged")
            cfg = Configuration.from_json({"types": r["types"]})
            if layout is not None:
                try:
                    layout.validate(cfg, strict_menu=False)
                except CoaloraError as e:
                    raise CoaloraError(f"archive {path}: record {i}: {e}") from None
            out.append(Record(**r))
        return cls(out)


# ---------------------------------------------------------------- fronts and hypervolume


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (minimize every column)."""
    pts = np.asarray(points, dtype=float)
    keep = []
    for i, p in enumerate(pts):
        dom = np.all(pts <= p, axis=1) & np.any(pts < p, axis=1)
        dup_before = np.all(pts[:i] == p, axis=1).any()  # keep one of identical points
        if not dom.any() and not dup_before:
            keep.append(i)
    return np.array(keep, dtype=int)


def bin_of(bpw: float, bin_width: float = BIN_WIDTH) -> int:
    return int(math.floor(bpw / bin_width + 1e-9))


def per_bin_fronts(records: Sequence[Record], bin_width: float = BIN_WIDTH) -> list[Record]:
    """Non-dominated (bpw, loss) records within each ``bin_width``-bit bin, lowest bpw first."""
    bins: dict[int, list[Record]] = {}
    for r in records:
        bins.setdefault(bin_of(r.bpw, bin_width), []).append(r)
    out = []
    for k in sorted(bins):
        rs = bins[k]
        idx = non_dominated(np.array([[r.bpw, r.loss] for r in rs]))
        out += sorted((rs[i] for i in idx), key=lambda r: r.bpw)
    return out


def reference_point(points: np.ndarray, bin_width: float = BIN_WIDTH) -> np.ndarray:
    """(bpw, loss) reference: worst archived bpw + one bin, worst loss + 10% of the loss range."""
    pts = np.asarray(points, dtype=float)
    span = float(pts[:, 1].max() - pts[:, 1].min()) or 1.0
    return np.array([pts[:, 0].max() + bin_width, pts[:, 1].max() + 0.1 * span])


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by ``points`` (minimize both) and bounded by ``ref``, via BoTorch's Hypervolume."""
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    hv = Hypervolume(ref_point=-torch.as_tensor(ref, dtype=torch.double))
    return float(hv.compute(-torch.as_tensor(pts[non_dominated(pts)], dtype=torch.double)))


# ---------------------------------------------------------------- encoding


class Encoder:
    """Configuration -> feature vector a GP can learn from tens of points.

    Column 0 is the exact bpw (the bits objective reads it back). Then the bpw of each module kind
    (attn_q ... ffn_down, token_embd, ...), the bpw of up to ``max_groups`` contiguous block groups,
    and, when an error table is given, log10 of the summed sensitivity error (a strong prior feature).
    """

    def __init__(self, layout: ModelLayout, errors: dict | None = None, max_groups: int = 8):
        self.layout, self.errors = layout, errors
        self.kinds = sorted({t.kind for t in layout.tensors})
        n_groups = max(1, min(max_groups, layout.n_blocks))
        self.group = {t.name: (t.block * n_groups // max(layout.n_blocks, 1) if t.block >= 0 else -1)
                      for t in layout.tensors}
        self.n_groups = n_groups
        self.dim = 1 + len(self.kinds) + n_groups + (errors is not None)

        # the features are ratios of sums over tensors: column numerators add up per tensor,
        # denominators (weights per column) do not depend on the types
        g0 = 1 + len(self.kinds)
        ki = {k: 1 + i for i, k in enumerate(self.kinds)}
        self.cols = {t.name: [0, ki[t.kind]] + ([g0 + self.group[t.name]] if self.group[t.name] >= 0 else [])
                     for t in layout.tensors}
        self.n_bits = 1 + len(self.kinds) + n_groups
        self.wts = np.zeros(self.n_bits)
        for t in layout.tensors:
            self.wts[self.cols[t.name]] += t.n_weights
        self.wts[self.wts == 0] = 1.0

    def sums(self, cfg: Configuration) -> tuple[np.ndarray, float]:
        """(bit numerators per column, summed sensitivity error) of ``cfg``."""
        bits = np.zeros(self.n_bits)
        err = 0.0
        for n, q in cfg.types.items():
            bits[self.cols[n]] += 8.0 * self.layout[n].bytes(q)
            if self.errors is not None:
                row = self.errors[n]
                err += row[q.name] if q.name in row else max(row.values())  # off-menu type: assume the worst
        return bits, err

    def features(self, bits: np.ndarray, err: np.ndarray | None) -> torch.Tensor:
        X = np.asarray(bits, dtype=float).reshape(-1, self.n_bits) / self.wts
        if self.errors is not None:
            X = np.hstack([X, np.log10(np.maximum(np.asarray(err, dtype=float).reshape(-1, 1), 1e-30))])
        return torch.as_tensor(X, dtype=torch.double)

    def __call__(self, cfgs: Sequence[Configuration]) -> torch.Tensor:
        s = [self.sums(c) for c in cfgs]
        return self.features(np.array([b for b, _ in s]).reshape(-1, self.n_bits), np.array([e for _, e in s]))


def fit_gp(X: torch.Tensor, y: torch.Tensor, maxiter: int = 100):
    """A SingleTaskGP (normalized inputs, standardized loss) fitted by marginal likelihood
    (L-BFGS capped at ``maxiter`` iterations: tens of points do not need more, and it keeps searches fast)."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    # columns that never vary carry no information and break Normalize; pin their bounds
    lo, hi = X.min(0).values, X.max(0).values
    bounds = torch.stack([lo, torch.where(hi > lo, hi, lo + 1.0)])
    gp = SingleTaskGP(X, y.reshape(-1, 1), input_transform=Normalize(X.shape[-1], bounds=bounds),
                      outcome_transform=Standardize(1))
    try:
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp),
                         optimizer_kwargs={"options": {"maxiter": maxiter}})
    except Exception:  # a failed optimizer run keeps the prior hyperparameters; still a usable model
        pass
    gp.eval()
    return gp


class Surrogate:
    """Loss predictor: a GP on the archive, encoded by :class:`Encoder`."""

    def __init__(self, layout: ModelLayout, archive: Archive, errors: dict | None = None):
        if len(archive) < 3:
            raise CoaloraError(f"the archive has {len(archive)} evaluated configurations; the surrogate needs 3")
        self.encode = Encoder(layout, errors)
        self.X = self.encode(archive.configs())
        self.gp = fit_gp(self.X, torch.as_tensor(archive.points()[:, 1], dtype=torch.double))

    def predict(self, cfgs: Sequence[Configuration]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the loss."""
        X = self.encode(cfgs)
        with torch.no_grad():
            post = self.gp.posterior(X)
        return post.mean.squeeze(-1).numpy(), post.variance.clamp_min(0).sqrt().squeeze(-1).numpy()


# ---------------------------------------------------------------- candidates


def mutate(layout: ModelLayout, cfg: Configuration, rng: random.Random) -> Configuration:
    """One random move: re-type a few tensors, or shift a whole block or module kind one menu step."""
    types = dict(cfg.types)
    names = layout.names()
    if rng.random() < 0.5:
        for n in rng.sample(names, k=min(len(names), rng.randint(1, 4))):
            types[n] = rng.choice(layout.menu(n))
    else:
        t0 = layout[rng.choice(names)]
        by_block = rng.random() < 0.5
        same = [t.name for t in layout.tensors if (t.block == t0.block if by_block else t.kind == t0.kind)]
        step = rng.choice((-1, 1))  # menus run from most to fewest bits: -1 is an upgrade
        for n in same:
            m = [q.name for q in layout.menu(n)]
            cur = get(types[n]).name
            i = m.index(cur) if cur in m else 0
            types[n] = m[min(max(i + step, 0), len(m) - 1)]
    return Configuration(types)


def make_candidate_pool(layout: ModelLayout, archive: Archive, n: int, seed: int = 0,
                        errors: dict | None = None, bpw_range: tuple[float, float] | None = None,
                        bin_width: float = BIN_WIDTH) -> list[Configuration]:
    """Up to ``n`` new configurations: mutations of per-bin front members and, with an error table,
    up to min(n/3, 40) allocations at random budgets with randomly perturbed tensor sensitivities."""
    from toolkit.sensitivity import allocate, byte_range, bytes_for_bpw

    rng = random.Random(seed)
    seen = archive.keys()
    lo_b, hi_b = bpw_range or (archive.points()[:, 0].min() - bin_width, archive.points()[:, 0].max() + bin_width)
    parents = [r.config() for r in per_bin_fronts(archive.records, bin_width)] or archive.configs()
    out: dict[Configuration, None] = {}
    n_greedy = min(n // 3, 40) if errors is not None else 0
    lo, hi = byte_range(layout)
    attempts = 0
    while len(out) < n_greedy and attempts < 3 * n_greedy:
        attempts += 1
        noise = {name: math.exp(rng.gauss(0.0, 0.5)) for name in errors}
        perturbed = {name: {q: e * noise[name] for q, e in row.items()} for name, row in errors.items()}
        budget = min(max(bytes_for_bpw(layout, rng.uniform(lo_b, hi_b)), lo), hi)
        c = allocate(layout, perturbed, budget)
        if c.key() not in seen:
            out.setdefault(c, None)
    attempts = 0
    while len(out) < n and attempts < 20 * n:
        attempts += 1
        c = rng.choice(parents)
        for _ in range(rng.randint(1, 3)):
            c = mutate(layout, c, rng)
        if c.key() not in seen and lo_b <= layout.bits_per_weight(c) <= hi_b:
            out.setdefault(c, None)
    return list(out)


# ---------------------------------------------------------------- one round


def _without_jit_kernels() -> None:
    """Keep botorch on its pure-PyTorch qLogEHVI. botorch >= 0.18 JIT-compiles a fused C++ kernel
    (``-march=native``) on first use into ``~/.cache/torch_extensions``, behind a lock file that a process killed
    while compiling leaves behind and every later process then waits on forever (a hang seen in the test suite);
    the kernel only speeds up the same computation."""
    try:
        from botorch.acquisition.multi_objective import logei
    except ImportError:
        return
    if hasattr(logei, "_load_attempted"):
        logei._load_attempted = True


def propose(layout: ModelLayout, archive: Archive, pool: Sequence[Configuration], n_new: int,
            errors: dict | None = None, ref: np.ndarray | None = None, mc_samples: int = 64,
            seed: int = 0) -> list[Configuration]:
    """Pick ``n_new`` of ``pool`` by sequential greedy qLogEHVI (q=1 each, kriging believer)."""
    from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement
    from botorch.acquisition.multi_objective.objective import MCMultiOutputObjective
    from botorch.sampling import SobolQMCNormalSampler
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    _without_jit_kernels()

    class BitsAndLoss(MCMultiOutputObjective):
        """BoTorch maximizes: (-bpw read exactly from feature column 0, -sampled loss)."""
        def forward(self, samples, X=None):
            return torch.cat([-X[..., :1].expand(samples.shape), -samples], dim=-1)

    sur = Surrogate(layout, archive, errors)
    pts = archive.points()
    ref = reference_point(pts) if ref is None else np.asarray(ref, dtype=float)
    ref_t = -torch.as_tensor(ref, dtype=torch.double)
    C = sur.encode(list(pool))
    Y = -torch.as_tensor(pts, dtype=torch.double)
    picked: list[int] = []
    for _ in range(min(n_new, len(pool))):
        part = FastNondominatedPartitioning(ref_point=ref_t, Y=Y)
        acq = qLogExpectedHypervolumeImprovement(
            sur.gp, ref_point=ref_t, partitioning=part, objective=BitsAndLoss(),
            sampler=SobolQMCNormalSampler(torch.Size([mc_samples]), seed=seed))
        with torch.no_grad():
            v = torch.cat([acq(C[i:i + 256].unsqueeze(1)) for i in range(0, len(C), 256)])
        v[picked] = -math.inf
        j = int(torch.argmax(v))
        picked.append(j)
        with torch.no_grad():
            mu = sur.gp.posterior(C[j:j + 1]).mean
        Y = torch.cat([Y, torch.cat([-C[j:j + 1, :1], -mu.reshape(1, 1)], dim=1)])
    return [pool[j] for j in picked]


def refine(layout: ModelLayout, archive: Archive, evaluate: Evaluate, n_new: int, seed: int = 0,
           candidate_pool: Sequence[Configuration] | None = None, errors: dict | None = None,
           pool_size: int = 400, bin_width: float = BIN_WIDTH,
           bpw_range: tuple[float, float] | None = None, round_index: int | None = None,
           seed_configurations: Sequence[Configuration] = ()) -> tuple[Archive, list[Configuration]]:
    """One round of the Pareto search: propose by EHVI, evaluate for real, archive; new training set.

    ``seed_configurations`` not yet archived (e.g. the current training set) are evaluated first,
    so a first round has data for the surrogate. ``candidate_pool`` (default:
    :func:`make_candidate_pool` of ``pool_size``) is the discrete space searched; the ``n_new``
    picks are evaluated with ``evaluate``. The archive is extended in place (records labelled
    ``round_index``, default the next round) and returned with the per-bin fronts.
    """
    if n_new < 0:
        raise CoaloraError("n_new must not be negative")
    rnd = archive.next_round if round_index is None else round_index
    seen = archive.keys()
    first = list(dict.fromkeys(c for c in seed_configurations if c.key() not in seen))
    if first:
        archive.add(layout, first, list(evaluate(first)), rnd)
    if len(archive) < 3:
        raise CoaloraError(f"the search needs at least 3 evaluated configurations to start, has {len(archive)}")
    pool = list(candidate_pool) if candidate_pool is not None else make_candidate_pool(
        layout, archive, pool_size, seed, errors, bpw_range, bin_width)
    seen = archive.keys()
    pool = list(dict.fromkeys(c for c in pool if c.key() not in seen))
    if pool and n_new:
        new = propose(layout, archive, pool, n_new, errors, seed=seed)
        archive.add(layout, new, list(evaluate(new)), rnd)
    return archive, [r.config() for r in per_bin_fronts(archive.records, bin_width)]


def summary(archive: Archive, training_set: Sequence[Configuration] | None = None,
            bin_width: float = BIN_WIDTH) -> dict:
    """Front, training set and hypervolume (with its reference point) as plain JSON data."""
    pts = archive.points()
    out = {"n_archive": len(archive), "bin_width": bin_width}
    if len(pts):
        ref = reference_point(pts, bin_width)
        front = pts[non_dominated(pts)]
        out.update(reference_point={"bpw": ref[0], "loss": ref[1]}, hypervolume=hypervolume(pts, ref),
                   front=[{"bpw": b, "loss": l} for b, l in sorted(front.tolist())])
    keys = {c.key() for c in (training_set or [])}
    out["training_set"] = [{"bpw": r.bpw, "loss": r.loss, "file_bytes": r.file_bytes, "round": r.round}
                           for r in archive.records if r.config().key() in keys]
    return out


def write_pareto_json(archive: Archive, training_set: Sequence[Configuration] | None, path,
                      bin_width: float = BIN_WIDTH) -> None:
    write_json(path, summary(archive, training_set, bin_width))


# ---------------------------------------------------------------- plot


def plot_pareto(archive: Archive, training_set: Sequence[Configuration] | None, path_png,
                layout: ModelLayout | None = None, bin_width: float = BIN_WIDTH, title: str | None = None) -> None:
    """bpw (x) vs loss (y): the archive by round, the training set, and the global Pareto front."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = archive.points()
    rounds = np.array([r.round for r in archive.records])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(pts):
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=rounds, cmap="viridis", s=14, alpha=0.7, label="archive")
        if rounds.max() > 0:
            fig.colorbar(sc, ax=ax, label="round")
        keys = {c.key() for c in (training_set or [])}
        ts = np.array([[r.bpw, r.loss] for r in archive.records if r.config().key() in keys]).reshape(-1, 2)
        ax.scatter(ts[:, 0], ts[:, 1], facecolors="none", edgecolors="red", s=50, label="training set")
        f = pts[non_dominated(pts)]
        f = f[np.argsort(f[:, 0])]
        ax.step(f[:, 0], f[:, 1], where="post", color="black", lw=1, label="Pareto front")
        for k in range(bin_of(pts[:, 0].min(), bin_width), bin_of(pts[:, 0].max(), bin_width) + 2):
            ax.axvline(k * bin_width, color="0.9", lw=0.5, zorder=0)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("calibration loss")
    ax.set_title(title or "configuration search")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
