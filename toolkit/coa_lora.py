"""CoA-LoRA in torch: quantization-exact LoRA layers and the configuration-aware model.

A ``QuantLoRALinear`` computes ``x W_q^T + s * x A^T (I + M)^T B^T`` where ``W_q`` is the
dequantization of the ggml bytes of the current quant type, ``A, B`` the shared LoRA and ``M``
an r x r adjustment that the ``ConfigAwareModel`` derives from the configuration (CoA-LoRA).
With type corrections (``train --type-deltas``) the configuration also picks, per tensor, a trained
correction of its quant type q: ``A + s dA[q]``, ``B + s dB[q]`` (the rank stays r), where ``s`` is the
tensor's ggml quantization error in type q relative to Q4_0 (so a Q8_0 tensor, which barely changes, gets a
small correction). An F32 tensor is the reference and gets no adjustment.
Switching configuration swaps cached weights and recomputes M: nothing is re-quantized.
"""
from __future__ import annotations

import contextlib

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from converters.quant_types import CATALOGUE_NAMES, IMATRIX_NAMES, get
from converters.configuration import Configuration, ModelLayout
from toolkit.ggml_activations import block_mins, emulate_ggml_ops, ggml_linear, vec_dot_kind

MODES = ("coa", "shared", "single")


class GGMLLinear(nn.Module):
    """``x W_q^T`` as llama.cpp's CPU backend computes it: ``W_q`` the dequantized ggml bytes of the current
    type, ``x`` rounded to the type's vec_dot format first (see :mod:`toolkit.ggml_activations`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight  # plain tensor, swapped per configuration, never trained
        # the source's bias (qwen2's attention biases), never trained; a buffer so that it follows .to()
        self.register_buffer("bias", bias, persistent=False)
        self.act_kind: str | None = None
        self.qtype: str | None = None
        self.mins: torch.Tensor | None = None  # block minima of a Q4_1 / Q5_1 weight

    def set_weight(self, weight: torch.Tensor, qtype: str) -> None:
        self.weight, self.act_kind, self.qtype = weight, vec_dot_kind(qtype), qtype
        self.mins = block_mins(weight) if self.act_kind == "Q8_1" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_linear(x, self.weight, self.act_kind, self.bias, self.mins)


class QuantLoRALinear(GGMLLinear):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator,
                 bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        n_out, n_in = weight.shape
        self.rank, self.scale = rank, alpha / rank
        a = torch.empty(rank, n_in)
        bound = 1.0 / math.sqrt(n_in)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank))
        self.delta_A, self.delta_B = nn.ParameterDict(), nn.ParameterDict()
        self.M: torch.Tensor | None = None
        self.corrected = True  # False: the shared pair only (no per-type correction)

    def add_type_deltas(self, qtypes) -> None:
        """Zero-initialized corrections of A and B, one pair per quant type this tensor can take, each with a
        fixed scale (a buffer, saved with the checkpoint; 1 until ``set_delta_scales``)."""
        for q in qtypes:
            self.delta_A[q] = nn.Parameter(torch.zeros_like(self.lora_A))
            self.delta_B[q] = nn.Parameter(torch.zeros_like(self.lora_B))
            self.register_buffer(f"delta_scale_{q}", torch.ones(()))

    def set_delta_scales(self, scales: dict[str, float]) -> None:
        for q, s in scales.items():
            getattr(self, f"delta_scale_{q}").fill_(s)

    def factors(self, qtype: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` for a tensor of quant type ``qtype``: the shared pair plus that type's scaled correction."""
        if qtype in self.delta_A:
            s = getattr(self, f"delta_scale_{qtype}")
            return self.lora_A + s * self.delta_A[qtype], self.lora_B + s * self.delta_B[qtype]
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(self.qtype if self.corrected else None)
        h = F.linear(x, a)  # llama.cpp keeps the LoRA path in F32
        if self.M is not None:
            h = h + F.linear(h, self.M)
        return super().forward(x) + self.scale * F.linear(h, b)


class ConfigAwareModel(nn.Module):
    """Per layer: quant-type, block and module-kind embeddings plus bits per weight -> r x r matrix M
    (the kinds are the architecture's block projections, e.g. attn_q ... ffn_down, or phi3's attn_qkv).

    One small MLP is shared by all layers; its last layer starts at zero so training starts from
    ``I + M = I`` (the plain shared LoRA).
    """

    def __init__(self, n_blocks: int, rank: int, kinds: tuple[str, ...], type_names=CATALOGUE_NAMES, emb: int = 16,
                 hidden: int = 64):
        super().__init__()
        self.rank = rank
        self.kinds = tuple(kinds)
        self.type_names = tuple(type_names)
        self.type_emb = nn.Embedding(len(self.type_names), emb)
        self.block_emb = nn.Embedding(max(n_blocks, 1), emb)
        self.kind_emb = nn.Embedding(len(self.kinds), emb)
        self.mlp = nn.Sequential(nn.Linear(3 * emb + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, rank * rank))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def features(self, layout: ModelLayout, cfg: Configuration, names: list[str]) -> dict[str, torch.Tensor]:
        specs = [layout[n] for n in names]
        qs = [cfg.types[n] for n in names]
        dev = self.type_emb.weight.device  # built where the model computes, once per configuration
        return {
            "type": torch.tensor([self.type_names.index(q.name) for q in qs], device=dev),
            "block": torch.tensor([s.block for s in specs], device=dev),
            "kind": torch.tensor([self.kinds.index(s.kind) for s in specs], device=dev),
            "bpw": torch.tensor([q.bits_per_weight / 8.0 - 1.0 for q in qs], device=dev),
            "global": torch.full((len(names),), layout.bits_per_weight(cfg) / 8.0 - 1.0, device=dev),
        }

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.type_emb(f["type"]), self.block_emb(f["block"]), self.kind_emb(f["kind"]),
                       f["bpw"][:, None].float(), f["global"][:, None].float()], dim=1)
        return self.mlp(x).view(-1, self.rank, self.rank)


class CoALoRAModel(nn.Module):
    """A Hugging Face causal LM whose target projections are ``QuantLoRALinear`` and whose
    quantizable tensors follow a ``Configuration`` through a ``WeightBank``."""

    def __init__(self, loaded, bank, layout: ModelLayout, *, mode: str = "coa", rank: int = 8, alpha: float = 16.0,
                 targets=None, seed: int = 0, type_deltas=()):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.loaded, self.bank, self.layout, self.mode = loaded, bank, layout, mode
        self.base = emulate_ggml_ops(loaded.model)
        for p in self.base.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        kinds = layout.projection_kinds()
        targets = kinds if targets is None else tuple(targets)
        self.lora_names = [t.name for t in layout.tensors if t.block >= 0 and t.kind in targets]
        self.layers = nn.ModuleDict()
        self.lora_layers: dict[str, QuantLoRALinear] = {}
        self.plain: dict[str, GGMLLinear] = {}
        for t in layout.tensors:
            if t.block < 0:
                continue
            parent, attr = self._module_slot(t.name)
            module = getattr(parent, attr)
            w = module.weight.detach()
            bias = None if getattr(module, "bias", None) is None else module.bias.detach()
            if t.name in self.lora_names:
                layer = QuantLoRALinear(w, rank, alpha, g, bias)
                if mode == "coa":
                    layer.add_type_deltas(q.name for q in layout.menu(t.name) if q.name in type_deltas)
                self.layers[t.name.replace(".", "_")] = layer  # registers the LoRA parameters
                self.lora_layers[t.name] = layer
            else:
                layer = self.plain[t.name] = GGMLLinear(w, bias)
            setattr(parent, attr, layer)
        # The output head: llama.cpp multiplies with output.weight, or token_embd.weight when tied.
        head = self.base.get_output_embeddings()
        self.head_source = "output.weight" if "output.weight" in layout.names() else "token_embd.weight"
        self.head = GGMLLinear(head.weight.detach())
        self.base.lm_head = self.head
        # Embeddings outside the layout are written in the writer's default type; follow it.
        from converters.model_loading import EMBEDDING_DEFAULT_TYPE
        self.fixed_types = {n: get(EMBEDDING_DEFAULT_TYPE) for n in ("token_embd.weight", "output.weight")
                            if n not in layout.names() and (n != "output.weight" or self.head_source == n)}
        # the IQ1-IQ3 types (menus with an imatrix) follow the catalogue, so older runs keep their embedding rows
        types = CATALOGUE_NAMES + tuple(n for n in IMATRIX_NAMES if n in layout.menu_names)
        self.cam = ConfigAwareModel(layout.n_blocks, rank, kinds, types) if mode == "coa" else None
        self.cfg: Configuration | None = None
        self._features = None
        self.adjusted = True

    @property
    def has_adjustments(self) -> bool:
        """Whether the adapter depends on the configuration (a configuration-aware model or per-type corrections)."""
        return self.cam is not None or any(len(layer.delta_A) for layer in self.lora_layers.values())

    @contextlib.contextmanager
    def variant(self, adjusted: bool):
        """Within the block the model computes with the generated adapter (``adjusted``) or with the shared LoRA
        alone: no configuration-aware adjustment, no per-type correction."""
        before = self.adjusted
        self.set_adjusted(adjusted)
        try:
            yield self
        finally:
            self.set_adjusted(before)

    def set_adjusted(self, adjusted: bool) -> None:
        self.adjusted = bool(adjusted)
        for layer in self.lora_layers.values():
            layer.corrected = self.adjusted

    def _module_slot(self, gguf_name: str):
        hf = self.loaded.hf_name(gguf_name)  # e.g. model.layers.0.self_attn.q_proj.weight
        path = hf.rsplit(".", 1)[0].split(".")
        parent = self.base
        for p in path[:-1]:
            parent = getattr(parent, p)
        return parent, path[-1]

    def to_device(self, device: torch.device) -> "CoALoRAModel":
        """Move the trainable and fixed parts to ``device``; quantized weights follow through the bank."""
        self.base.to(device)
        self.layers.to(device)
        if self.cam is not None:
            self.cam.to(device)
        self.bank.to(device)
        if self.cfg is not None:
            self.set_configuration(self.cfg)
        return self

    def layer(self, name: str) -> QuantLoRALinear:
        return self.lora_layers[name]

    def set_configuration(self, cfg: Configuration) -> None:
        """Point every quantizable tensor at the dequantized ggml bytes of its type in ``cfg``."""
        for name, q in {**self.fixed_types, **cfg.types}.items():
            w = self.bank.weight(name, q)
            if name in self.lora_layers:
                self.lora_layers[name].set_weight(w, q.name)
            elif name in self.plain:
                self.plain[name].set_weight(w, q.name)
            else:  # token_embd (a lookup: exact dequantized rows) and output
                if name == "token_embd.weight":
                    self.base.get_input_embeddings().weight.data = w
                if name == self.head_source:
                    self.head.set_weight(w, q.name)
        self.cfg = cfg
        if self.cam is not None:
            self._features = self.cam.features(self.layout, cfg, self.lora_names)

    def adjustments(self) -> torch.Tensor | None:
        return None if self.cam is None else self.cam(self._features)

    @staticmethod
    def _adjusted(cfg: Configuration, name: str) -> bool:
        """The configuration-aware model adjusts quantized tensors; an F32 tensor is the reference."""
        return cfg.types[name].name != "F32"

    def refresh_M(self) -> None:
        Ms = self.adjustments() if self.adjusted else None
        for i, name in enumerate(self.lora_names):
            self.layer(name).M = Ms[i] if Ms is not None and self._adjusted(self.cfg, name) else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if self.cfg is None:
            raise RuntimeError("set_configuration() first")
        self.refresh_M()
        return self.base(input_ids=input_ids, labels=labels, use_cache=False)

    @torch.no_grad()
    def adapter_tensors(self, cfg: Configuration, adjusted: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The llama.cpp LoRA pairs for ``cfg``: (I + M) folded into A, B rows in GGUF order (``adjusted``
        False: the shared LoRA alone)."""
        Ms = None
        if self.cam is not None and adjusted:
            Ms = self.cam(self.cam.features(self.layout, cfg, self.lora_names))
        out = {}
        for i, name in enumerate(self.lora_names):
            a, b = self.layer(name).factors(cfg.types[name].name if adjusted else None)
            a = a + Ms[i] @ a if Ms is not None and self._adjusted(cfg, name) else a
            b = self.loaded.permute_rows(name, b.cpu().numpy())
            out[name] = (a.cpu().numpy().astype(np.float32), np.ascontiguousarray(b, dtype=np.float32))
        return out

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k.startswith(("layers.", "cam."))}

    def load_lora_state(self, state: dict[str, torch.Tensor], parts: tuple[str, ...] = ("layers.", "cam.")) -> None:
        """Load the ``parts`` (LoRA layers, configuration-aware model) of a checkpoint; they must match exactly
        (checkpoints from before correction scales existed keep scale 1, as they were trained)."""
        own = self.state_dict()
        missing = [k for k in own if k.startswith(parts) and k not in state and ".delta_scale_" not in k]
        if missing or any(k not in own or own[k].shape != v.shape for k, v in state.items()):
            raise ValueError("checkpoint does not match this model")
        self.load_state_dict(state, strict=False)
