"""Save and restore quantized linear layers as they are held at run time (for engine directories).

A quantized layer is fully described by its class, its parameters (packed weights, scales,
zeros, bias, input scale / permutation) and a few plain attributes (``group_size``,
``backend``, ``fast_dequant``, the fused layer's ``q_size`` / ``output_sizes``...).
``layer_spec`` records the class name and the plain attributes (JSON values);
``restore_quantized_linear`` rebuilds the layer from that spec and the saved tensors without
quantizing anything: the tensors become the layer's parameters as they are.

Only classes defined in rtllm.layers.quant (subclasses of QuantizedLinear) can be restored: a
spec names a class, never an import path, so a config file cannot make the loader import code.
"""

from __future__ import annotations

import torch
from torch import nn

from rtllm.layers.quant.base import QuantizedLinear, frozen

# parameters every QuantizedLinear has (None when unused); the forward reads them
_OPTIONAL_PARAMS = ("bias", "input_scale", "input_perm")
_JSON_SCALARS = (bool, int, float, str, type(None))


def _json_value(v: object) -> bool:
    if isinstance(v, _JSON_SCALARS):
        return True
    if isinstance(v, list | tuple):
        return all(isinstance(x, _JSON_SCALARS) for x in v)
    return False


def quantized_linear_classes() -> dict[str, type[QuantizedLinear]]:
    """Every QuantizedLinear subclass by class name (the formats of rtllm.layers.quant)."""
    import rtllm.layers.quant  # noqa: F401  (defines the subclasses)

    found: dict[str, type[QuantizedLinear]] = {}
    todo = list(QuantizedLinear.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def layer_spec(layer: QuantizedLinear) -> dict:
    """{"class": name, "attrs": {plain attributes}, "tensors": [parameter names]} of a quantized layer."""
    attrs = {}
    for k, v in sorted(vars(layer).items()):
        if k.startswith("_") or k == "training":
            continue
        if not _json_value(v):  # state a restored layer would lack: refuse to save rather than lose it
            raise ValueError(f"{type(layer).__name__}.{k} ({type(v).__name__}) cannot be saved in an engine "
                             f"directory (plain JSON values and parameters only)")
        attrs[k] = list(v) if isinstance(v, tuple) else v
    tensors = sorted(n for n, p in layer.named_parameters(recurse=False) if p is not None)
    return {"class": type(layer).__name__, "attrs": attrs, "tensors": tensors}


def restore_quantized_linear(spec: dict, tensors: dict[str, torch.Tensor],
                             replaced: nn.Module | None = None) -> QuantizedLinear:
    """The layer ``spec`` describes, holding ``tensors`` (parameter name -> tensor) as they are.

    ``replaced``: the dense layer it takes the place of; its plain attributes the spec lacks are
    copied (as quantization does). Raises ValueError for an unknown class or a tensor set that is
    not the spec's."""
    classes = quantized_linear_classes()
    name = spec.get("class")
    cls = classes.get(name)
    if cls is None:
        raise ValueError(f"unknown quantized layer class {name!r}; this rtllm has {sorted(classes)}")
    want = set(spec.get("tensors", ()))
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise ValueError(f"{name}: tensors do not match the layer spec (missing {missing}, unexpected {extra})")
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for p in _OPTIONAL_PARAMS:
        layer.register_parameter(p, None)
    for p, t in tensors.items():
        if not p.isidentifier():
            raise ValueError(f"{name}: bad parameter name {p!r}")
        setattr(layer, p, frozen(t))
    for k, v in spec.get("attrs", {}).items():
        setattr(layer, k, v)
    if replaced is not None:
        layer.copy_attributes(replaced)
    return layer
