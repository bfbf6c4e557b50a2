"""PyTorch peers of lmgrad's factored sketch: the same job, on the same weights and pairs, written the
way the PyTorch attribution tools do it at their fastest.

* `TorchHookSketch` (LoGra / bergson style): forward hooks keep each layer's input x, a tensor hook on
  its output receives δ = ∂loss/∂y in the one batched backward of Σ_b sign_b·nll_b; both are
  projected at once (P_in x, P_out δ) and the per-example block Σ_t (P_out δ_t)(P_in x_t)ᵀ is formed;
  the per-example gradient never exists. No parameter requires grad (the backward computes only
  activation gradients, what lmgrad's path does too); the embedding outputs are made leaves that
  require grad, so δ flows everywhere.
* `TorchVmapSketch` (`torch.func`): exact per-pair gradient differentials, `vmap(grad)` of
  `functional_call` on the transformers model, then the same Kronecker projection P_out G P_inᵀ of
  each weight (in chunks of pairs, to bound memory).

Both take lmgrad's projection matrices (`FactoredSketchFn.factors()`, materialised as torch tensors),
so on a spec that sketches weight matrices only (``handle_vectors="exclude"``) both return the same
[B, K] sketch as lmgrad in the same layout; `tests/test_bench_peers.py` checks that on a tiny model.
Block conventions are lmgrad's (`lmgrad.grads.factored` docstring): (out, in) orientation, GPT-2's
Conv1D transposed, embeddings as the (tied) head's weight with P_out over the vocabulary.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

FIELDS = ("input_ids", "attention_mask", "target_mask")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers without Conv1D: no GPT-2 layers to meet
        return None
    return Conv1D


def torch_factors(factors: Mapping[str, tuple[Any, Any]], dtype: torch.dtype = torch.float32,
                  device: Any = None) -> dict[str, tuple]:
    """lmgrad's {module path: (P_out, P_in)} as torch tensors (P_in None for norms) on `device`."""
    t = lambda a: None if a is None else torch.tensor(np.array(a), dtype=dtype, device=device)  # noqa: E731
    return {k: (t(po), t(pi)) for k, (po, pi) in factors.items()}


def _batch(good: Mapping[str, Any], bad: Mapping[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
    """Concatenated [2B, T] ids, attention mask, target mask, and the row signs (+1 good, −1 bad, 0 padding rows)."""
    g = {k: torch.as_tensor(np.asarray(good[k])) for k in FIELDS}
    b = {k: torch.as_tensor(np.asarray(bad[k])) for k in FIELDS}
    valid = torch.as_tensor(np.asarray(good.get("valid", np.ones(g["input_ids"].shape[0], bool))))
    ids = torch.cat([g["input_ids"], b["input_ids"]]).long()
    am = torch.cat([g["attention_mask"], b["attention_mask"]]).long()
    tm = torch.cat([g["target_mask"], b["target_mask"]]).float()
    v = torch.cat([valid, valid]).float()
    sign = torch.cat([torch.ones(len(valid)), -torch.ones(len(valid))]) * v
    return tuple(x.to(device) for x in (ids, am, tm, sign))


def _nll(logits: torch.Tensor, ids: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    """−Σ_t tm[t]·log p(ids[t] | < t) per row, as `lmgrad.scoring.sequence_logprob` (column 0 unscored)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lp = torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
    return -(lp * tm[:, 1:]).sum(-1)


def _positions(ids: torch.Tensor) -> torch.Tensor:
    """Per-row position ids, so a learned position table's δ is per example (as lmgrad broadcasts it)."""
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


class TorchHookSketch:
    """fn(good, bad) → float32 numpy [B, K]: hook-based factored sketch of each pair's differential.

    `layout` is lmgrad's (`FactoredSketchFn.layout`, weight blocks only); `factors` lmgrad's matrices.
    """

    def __init__(self, model: nn.Module, factors: Mapping[str, tuple], layout: Sequence[Mapping[str, Any]]):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.factors = torch_factors(factors, device=self.device)
        self.layout = list(layout)
        conv1d = _conv1d_type()
        mods = dict(model.named_modules())
        emb_by_weight = {id(m.weight): name for name, m in mods.items() if isinstance(m, nn.Embedding)}
        self.hooked: dict[str, tuple[str, str]] = {}  # torch module name → (lmgrad prefix, role)
        wanted = {e["module"] for e in self.layout}
        for name, m in mods.items():
            if isinstance(m, nn.Embedding) and name in wanted:
                self.hooked[name] = (name, "lookup")
            elif isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d)):
                tied = emb_by_weight.get(id(m.weight))
                if tied is not None and tied in wanted:
                    self.hooked[name] = (tied, "head")  # the tied head adds to the embedding's block
                elif name in wanted:
                    self.hooked[name] = (name, "conv1d" if not isinstance(m, nn.Linear) else "linear")
        missing = wanted - {p for p, _ in self.hooked.values()}
        if missing:
            raise ValueError(f"TorchHookSketch: no torch module for lmgrad blocks {sorted(missing)}")
        if any(e["role"] != "weight" for e in self.layout):
            raise ValueError("TorchHookSketch: sketches weight matrices only (use handle_vectors='exclude')")
        self._mods = mods
        self._state: dict[str, Any] = {}

    def _forward_hook(self, name: str):
        prefix, role = self.hooked[name]
        p_out, p_in = self.factors[prefix]

        def hook(module, inputs, output):
            st = self._state
            mask = st["tok"]
            if role == "lookup":
                ids = inputs[0]
                if ids.shape[0] != mask.shape[0]:
                    raise ValueError("TorchHookSketch: pass per-row ids to every embedding")
                a = p_out.T[ids] * mask  # P_out one-hot(id): column id of P_out, [N, T, r_out]
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                output.register_hook(lambda g: self._finish(name, prefix, a, (g @ p_in.T) * mask, lookup=True))
                return output
            a = (inputs[0] @ p_in.T) * mask  # P_in x, projected in the forward pass: x is not kept
            output.register_hook(lambda g: self._finish(name, prefix, a, (g @ p_out.T) * mask, lookup=False))
            return None

        return hook

    def _finish(self, name: str, prefix: str, a: torch.Tensor, c: torch.Tensor, lookup: bool) -> None:
        # lookup: a = P_out-side [N, T, r_out], c = P_in-side; else a = P_in x, c = P_out δ.
        out_side, in_side = (a, c) if lookup else (c, a)
        n = out_side.shape[0] // 2
        blk = torch.einsum("nto,nti->noi", out_side, in_side)
        blk = blk[:n] + blk[n:]  # pair differential = good rows + bad rows (the sign is in δ)
        acc = self._state["blocks"]
        acc[prefix] = blk if prefix not in acc else acc[prefix] + blk

    def __call__(self, good: Mapping[str, Any], bad: Mapping[str, Any]) -> np.ndarray:
        ids, am, tm, sign = _batch(good, bad, self.device)
        tok = ((am > 0) & (sign != 0)[:, None]).float()[..., None]
        self._state = {"tok": tok, "blocks": {}}
        # Hooks live for this call only: the same torch model serves other methods in a bench process.
        handles = [self._mods[n].register_forward_hook(self._forward_hook(n)) for n in self.hooked]
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=ids, attention_mask=am, position_ids=_positions(ids)).logits
                (sign * _nll(logits, ids, tm)).sum().backward()
        finally:
            for h in handles:
                h.remove()
        blocks = self._state["blocks"]
        self._state = {}
        n = ids.shape[0] // 2
        return torch.cat([blocks[e["module"]].reshape(n, -1) for e in self.layout], 1).cpu().numpy()


class TorchVmapSketch:
    """fn(good, bad) → float32 numpy [B, K]: `torch.func.vmap(grad)` per-pair gradients, then the same
    Kronecker projection P_out G P_inᵀ per weight; `chunk` pairs at a time (memory: chunk × params)."""

    def __init__(self, model: nn.Module, factors: Mapping[str, tuple], layout: Sequence[Mapping[str, Any]],
                 chunk: int | None = None):
        from torch.func import functional_call, grad, vmap

        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.factors = torch_factors(factors, device=self.device)
        self.layout = list(layout)
        if any(e["role"] != "weight" for e in self.layout):
            raise ValueError("TorchVmapSketch: sketches weight matrices only (use handle_vectors='exclude')")
        params = dict(model.named_parameters())
        self.wanted = [e["name"] for e in self.layout]
        self.kind = {e["name"]: e["kind"] for e in self.layout}
        self.module = {e["name"]: e["module"] for e in self.layout}
        missing = [n for n in self.wanted if n not in params]
        if missing:
            raise ValueError(f"TorchVmapSketch: parameters not in the torch model: {missing}")
        self.params = {k: v.detach() for k, v in params.items()}
        self.chunk = chunk
        self._masked = True

        def nll(p, ids, am, tm):
            kw = {"input_ids": ids[None], "position_ids": torch.arange(ids.shape[0], device=ids.device)[None]}
            if self._masked:  # transformers' sdpa mask helper branches on the mask's values, which vmap refuses
                kw["attention_mask"] = am[None]
            out = functional_call(model, p, (), kw)
            return _nll(out.logits, ids[None], tm[None])[0]

        def diff(w, rest, gi, ga, gt, bi, ba, bt):
            p = {**rest, **w}
            return nll(p, gi, ga, gt) - nll(p, bi, ba, bt)

        self._grads = vmap(grad(diff), in_dims=(None, None, 0, 0, 0, 0, 0, 0))

    def _project(self, name: str, g: torch.Tensor) -> torch.Tensor:
        p_out, p_in = self.factors[self.module[name]]
        g_oi = g.transpose(1, 2) if self.kind[name] == "conv1d" else g
        return torch.einsum("ro,boi->bri", p_out, g_oi @ p_in.T)  # G P_inᵀ first: the cheaper order

    def __call__(self, good: Mapping[str, Any], bad: Mapping[str, Any]) -> np.ndarray:
        g = {k: torch.as_tensor(np.asarray(good[k])) for k in FIELDS}
        b = {k: torch.as_tensor(np.asarray(bad[k])) for k in FIELDS}
        valid = np.asarray(good.get("valid", np.ones(g["input_ids"].shape[0], bool)))
        n = len(valid)
        w = {k: self.params[k] for k in self.wanted}
        rest = {k: v for k, v in self.params.items() if k not in w}
        out = np.zeros((n, sum(e["size"] for e in self.layout)), np.float32)
        rows = np.flatnonzero(valid)
        # Without padding the mask is all ones and is left out (as transformers does for None).
        self._masked = not all(bool((t["attention_mask"][torch.as_tensor(rows)] > 0).all()) for t in (g, b))
        step = self.chunk or max(len(rows), 1)
        for s in range(0, len(rows), step):
            i = torch.as_tensor(rows[s: s + step])
            args = [(t[k][i].float() if k == "target_mask" else t[k][i].long()).to(self.device)
                    for t in (g, b) for k in FIELDS]
            grads = self._grads(w, rest, *args)
            out[rows[s: s + step]] = torch.cat(
                [self._project(name, grads[name]).reshape(len(i), -1) for name in self.wanted], 1).cpu().numpy()
        return out


def make_peer(kind: str, model: nn.Module, factors: Mapping[str, tuple], layout: Sequence[Mapping[str, Any]],
              **kw: Any):
    """``"hooks"`` → `TorchHookSketch`, ``"vmap"`` → `TorchVmapSketch`."""
    if kind == "hooks":
        return TorchHookSketch(model, factors, layout)
    if kind == "vmap":
        return TorchVmapSketch(model, factors, layout, **kw)
    raise ValueError(f"unknown torch peer {kind!r}; expected 'hooks' or 'vmap'")
