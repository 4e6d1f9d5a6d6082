"""Save and restore quantized layers as they are held at run time (for engine directories).

A quantized layer is fully described by its class, its parameters (packed weights, scales,
zeros, bias, input scale / permutation) and a few plain attributes (``group_size``,
``backend``, ``fast_dequant``, the fused layer's ``q_size`` / ``output_sizes``, the INT8
embedding's ``out_dtype``...). ``layer_spec`` records the class name and the plain attributes
(JSON values); ``restore_quantized_layer`` rebuilds the layer from that spec and the saved tensors
without quantizing anything: the tensors become the layer's parameters as they are (a tensor given
as an ``nn.Parameter`` is held as that very object, so a tied LM head and embedding share it again).

Only the classes of rtllm.layers.quant (subclasses of QuantizedLinear, and Int8Embedding) can be
restored: a spec names a class, never an import path, so a config file cannot make the loader
import code.
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


def quantized_layer_classes() -> dict[str, type[nn.Module]]:
    """Every class an engine directory may name: the quantized linear layers and the INT8 embedding."""
    from rtllm.layers.quant.vocab import Int8Embedding

    return {**quantized_linear_classes(), Int8Embedding.__name__: Int8Embedding}


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of the layers an engine directory stores by spec."""
    from rtllm.layers.quant.vocab import Int8Embedding

    return isinstance(module, QuantizedLinear | Int8Embedding)


def layer_spec(layer: nn.Module) -> dict:
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
    """restore_quantized_layer for a spec that must name a QuantizedLinear class."""
    if spec.get("class") not in quantized_linear_classes():
        raise ValueError(f"unknown quantized layer class {spec.get('class')!r}; this rtllm has "
                         f"{sorted(quantized_linear_classes())}")
    return restore_quantized_layer(spec, tensors, replaced)


def restore_quantized_layer(spec: dict, tensors: dict[str, torch.Tensor],
                            replaced: nn.Module | None = None) -> nn.Module:
    """The layer ``spec`` describes, holding ``tensors`` (parameter name -> tensor) as they are.

    ``replaced``: the dense layer it takes the place of; for a linear layer, its plain attributes
    the spec lacks are copied (as quantization does). Raises ValueError for an unknown class or a
    tensor set that is not the spec's."""
    classes = quantized_layer_classes()
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
    linear = issubclass(cls, QuantizedLinear)
    for p in _OPTIONAL_PARAMS if linear else ():
        layer.register_parameter(p, None)
    for p, t in tensors.items():
        if not p.isidentifier():
            raise ValueError(f"{name}: bad parameter name {p!r}")
        setattr(layer, p, t if isinstance(t, nn.Parameter) else frozen(t))
    for k, v in spec.get("attrs", {}).items():
        if not k.isidentifier() or callable(getattr(cls, k, None)) or isinstance(getattr(cls, k, None), property):
            raise ValueError(f"{name}: bad attribute name {k!r} (a spec sets plain attributes only)")
        setattr(layer, k, v)
    if replaced is not None and linear:
        layer.copy_attributes(replaced)
    return layer
