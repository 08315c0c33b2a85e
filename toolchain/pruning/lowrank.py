"""Low-rank factorisation of convolutions and linear layers into ordinary layers.

A ``k x k`` convolution ``W (O, I, k, k)`` becomes a Tucker-2 chain (HOSVD): a ``1x1``
convolution ``I -> r_in``, the ``k x k`` core ``r_in -> r_out`` (the original stride, padding
and dilation), and a ``1x1`` convolution ``r_out -> O`` carrying the bias. A ``1x1`` convolution
or a linear layer ``W (O, I)`` becomes an SVD pair ``I -> r -> O`` (the singular values split as
square roots between the two). At full rank the chain computes the original layer (up to
float rounding); every factor is a plain ``nn.Conv2d``/``nn.Linear``, so export and every
runtime see ordinary layers.

A factorised model is described by records ``{"layer", "kind", "ranks"}`` that
:func:`apply_structure` replays on a freshly built model (empty factors of the right shapes),
so a saved model reloads from its spec, its pruning history and these records, never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Record = dict[str, Any]  # {"layer": str, "kind": "tucker2" | "svd", "ranks": [int, ...]}


def factorizable(module: nn.Module) -> str | None:
    """``"tucker2"``, ``"svd"`` or None (grouped, transposed, 1-d/3-d convs stay as they are)."""
    if isinstance(module, nn.Linear):
        return "svd"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "svd" if module.kernel_size == (1, 1) else "tucker2"
    return None


def _weight(module: nn.Module) -> Tensor:
    assert isinstance(module, (nn.Conv2d, nn.Linear))
    return module.weight


def _unfold(weight: Tensor, mode: int) -> Tensor:
    return weight.transpose(0, mode).reshape(weight.shape[mode], -1)


def spectra(module: nn.Module) -> list[Tensor]:
    """Singular values per factorised mode: ``[sigma_in, sigma_out]`` (Tucker-2) or ``[sigma]``."""
    weight = _weight(module).detach().double()
    if factorizable(module) == "tucker2":
        return [torch.linalg.svdvals(_unfold(weight, 1)), torch.linalg.svdvals(_unfold(weight, 0))]
    return [torch.linalg.svdvals(weight.flatten(1))]


def rank_for_energy(sigma: Tensor, energy: float) -> int:
    """The smallest rank keeping at least ``energy`` of ``sum(sigma^2)`` (at least 1)."""
    share = torch.cumsum(sigma**2, 0) / (sigma**2).sum().clamp_min(1e-30)
    return max(1, min(int((share < energy - 1e-12).sum()) + 1, len(sigma)))


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple) else (int(value), int(value))


def _core(cin: int, cout: int, like: nn.Conv2d) -> nn.Conv2d:
    """A conv with ``like``'s kernel, stride, padding and dilation (no bias: the last factor has it)."""
    padding = like.padding if isinstance(like.padding, str) else _pair(like.padding)
    return nn.Conv2d(
        cin,
        cout,
        _pair(like.kernel_size),
        _pair(like.stride),
        padding,
        _pair(like.dilation),
        bias=False,
        padding_mode=like.padding_mode,
    )


def empty_factors(module: nn.Module, kind: str, ranks: Sequence[int]) -> nn.Sequential:
    """The factor chain for ``module`` at ``ranks``, with uninitialised weights (for loading)."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        (r,) = ranks
        return nn.Sequential(
            nn.Linear(module.in_features, r, bias=False), nn.Linear(r, module.out_features, bias=bias)
        )
    assert isinstance(module, nn.Conv2d)
    if kind == "svd":
        (r,) = ranks
        first = nn.Conv2d(module.in_channels, r, 1, _pair(module.stride), bias=False)
        return nn.Sequential(first, nn.Conv2d(r, module.out_channels, 1, bias=bias))
    r_in, r_out = ranks
    return nn.Sequential(
        nn.Conv2d(module.in_channels, r_in, 1, bias=False),
        _core(r_in, r_out, module),
        nn.Conv2d(r_out, module.out_channels, 1, bias=bias),
    )


@torch.no_grad()
def factorize(module: nn.Module, ranks: Sequence[int]) -> tuple[nn.Sequential, Record]:
    """Decompose ``module`` at ``ranks`` (truncated HOSVD / SVD); returns the chain and its record."""
    kind = factorizable(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} cannot be factorised")
    chain = empty_factors(module, kind, ranks)
    weight = _weight(module).detach().double()
    factors = [_weight(layer) for layer in chain]
    if kind == "svd":
        (r,) = ranks
        u, s, vh = torch.linalg.svd(weight.flatten(1), full_matrices=False)
        root = s[:r].sqrt()
        factors[0].copy_((root[:, None] * vh[:r]).float().view_as(factors[0]))
        factors[1].copy_((u[:, :r] * root[None, :]).float().view_as(factors[1]))
    else:
        r_in, r_out = ranks
        u_in = torch.linalg.svd(_unfold(weight, 1), full_matrices=False)[0][:, :r_in]  # (I, r_in)
        u_out = torch.linalg.svd(_unfold(weight, 0), full_matrices=False)[0][:, :r_out]  # (O, r_out)
        core = torch.einsum("oikl,or,is->rskl", weight, u_out, u_in)  # (r_out, r_in, k, k)
        factors[0].copy_(u_in.T.reshape(r_in, -1, 1, 1).float())
        factors[1].copy_(core.float())
        factors[2].copy_(u_out.reshape(-1, r_out, 1, 1).float())
    bias, last = getattr(module, "bias", None), chain[-1]
    if bias is not None:
        assert isinstance(last, (nn.Conv2d, nn.Linear)) and last.bias is not None
        last.bias.copy_(bias.detach())
    return chain, {"kind": kind, "ranks": [int(r) for r in ranks]}


def apply_structure(model: nn.Module, records: Sequence[Record]) -> None:
    """Replace each recorded layer by empty factors of the recorded ranks (load weights after).

    Raises:
        ValueError: a record names a missing or non-factorisable layer.
    """
    for record in records:
        name = record["layer"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"factorised layer {name!r} is not in the model") from None
        kind = factorizable(module)
        if kind is None or kind != record["kind"]:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) cannot hold a {record['kind']} record"
            )
        model.set_submodule(name, empty_factors(module, kind, record["ranks"]))


def replace_with_factors(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> list[Record]:
    """Factorise every layer in ``plan`` (name -> ranks) in place; returns the records."""
    records = []
    for name, ranks in plan.items():
        chain, record = factorize(model.get_submodule(name), ranks)
        model.set_submodule(name, chain)
        records.append({"layer": name, **record})
    return records


@dataclass(frozen=True)
class LayerShape:
    """What the cost of a layer and of its factors depends on."""

    kind: str
    cin: int
    cout: int
    kernel: int  # k*k
    positions_in: int  # batch * input spatial positions (1 for linear)
    positions_out: int
    bias: bool

    def macs(self, ranks: Sequence[int] | None) -> int:
        """MACs as torch-pruning counts them (a bias costs one per output element)."""
        bias = self.cout * self.positions_out if self.bias else 0
        if ranks is None:
            return self.cin * self.cout * self.kernel * self.positions_out + bias
        if self.kind == "svd":
            (r,) = ranks
            return (self.cin * r + r * self.cout) * self.positions_out + bias
        r_in, r_out = ranks
        return (
            self.cin * r_in * self.positions_in
            + (r_in * r_out * self.kernel + r_out * self.cout) * self.positions_out
            + bias
        )

    def params(self, ranks: Sequence[int] | None) -> int:
        bias = self.cout if self.bias else 0
        if ranks is None:
            return self.cin * self.cout * self.kernel + bias
        if self.kind == "svd":
            (r,) = ranks
            return self.cin * r + r * self.cout + bias
        r_in, r_out = ranks
        return self.cin * r_in + r_in * r_out * self.kernel + r_out * self.cout + bias


def layer_shapes(
    model: nn.Module, example_inputs: Tensor, skip: Sequence[nn.Module] = ()
) -> dict[str, LayerShape]:
    """The factorisable layers of ``model`` (but ``skip``) with the sizes of one forward pass."""
    shapes: dict[str, LayerShape] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        kind = factorizable(module)
        if kind is None or module in skip or names[module] in shapes:
            return
        x = inputs[0]
        if isinstance(module, nn.Linear):
            pin = pout = x.numel() // module.in_features
            shape = LayerShape(
                kind, module.in_features, module.out_features, 1, pin, pout, module.bias is not None
            )
        else:
            assert isinstance(module, nn.Conv2d)
            k = module.kernel_size[0] * module.kernel_size[1]
            pin = x.shape[0] * x.shape[2] * x.shape[3]
            pout = output.shape[0] * output.shape[2] * output.shape[3]
            shape = LayerShape(
                kind, module.in_channels, module.out_channels, k, pin, pout, module.bias is not None
            )
        shapes[names[module]] = shape

    handles = [m.register_forward_hook(record) for m in model.modules() if factorizable(m)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was)
        for handle in handles:
            handle.remove()
    return shapes
