"""Quantized weights: how they are stored, turned back into floats, and multiplied.

A quantized checkpoint is an ordinary checkpoint directory whose ``config.json`` carries a
``quantization`` entry (:class:`cpmlive.config.QuantConfig`) and whose safetensors file holds,
for every quantized layer, integer codes and their scales in place of the float weight:

* **int8**, per output channel, symmetric: ``weight`` int8 ``[out, in]`` and ``weight_scale``
  float32 ``[out]``; ``w = code * scale``. The tied embedding / output head is stored this way
  too, one scale per vocabulary row.
* **int4**, group-wise along the input, asymmetric: ``weight`` uint8 ``[out, in / 2]`` (two
  codes a byte, the even column in the low nibble), ``weight_scale`` float32
  ``[out, in / group]`` and ``weight_zero`` uint8 ``[out, in / group]``;
  ``w = (code - zero) * scale``.

The file says what the weights are, never which kernel reads them: :class:`QuantizedLinear`
picks the fastest product this torch build has for the format (``benchmarks/quant_kernels.py``
measures them) and keeps any kernel-specific copy in memory only. How the codes are chosen
(round-to-nearest here; GPTQ and AWQ in ``cpmlive.compress``) is not this module's business.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmlive.config import QuantConfig
from cpmlive.errors import CpmliveError
import cpmlive.model.runtime.native as native
from cpmlive.utils import replace_submodule

INT8_MAX = 127
INT4_MAX = 15
# Where int4pack reads its codes: ``(code - 8) * scale + zero_point`` (zero points are floats).
INT4PACK_OFFSET = 8
INT4PACK_INNER_TILES = 8
INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4pack kernel takes
# Weight-only products of more rows than this dequantize and use F.linear: torch's int8pack and
# int4pack kernels lose to that from a few rows on (benchmarks/quant_kernels.py).
PACKED_KERNEL_MAX_ROWS = 4
INT8_NATIVE_MAX_ROWS = 64  # our loops beat dequantizing first up to here (benchmarks/quant_kernels.py --rows 16 64)
# fbgemm's dynamic int8 product: on x86 the fastest int8 product torch has (benchmarks/quant_kernels.py).
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
# Scales are floored so that an all-zero row or group codes to zeros instead of dividing by 0.
MIN_SCALE = 1e-12

# ---- codes <-> floats -------------------------------------------------------------------------


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric int8 codes and one scale per row (absmax / 127)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=MIN_SCALE)
    codes = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (codes.to(dtype) * scale.to(dtype)[:, None])


def int4_group_params(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of each group ``[..., group]`` (min/max with 0 inside the range)."""
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / INT4_MAX).clamp(min=MIN_SCALE)
    zero = torch.round(-low / scale).clamp(0, INT4_MAX)
    return scale, zero


def int4_codes(values: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Codes 0..15 of ``values`` on the grid ``(code - zero) * scale`` (broadcasting)."""
    return (torch.round(values / scale) + zero).clamp(0, INT4_MAX)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest int4 codes (packed), scales and zero points per ``group_size`` columns."""
    check_group_size(weight.size(1), group_size)
    w = weight.detach().float()
    groups = w.view(w.size(0), -1, group_size)
    scale, zero = int4_group_params(groups)
    codes = int4_codes(groups, scale[..., None], zero[..., None]).view_as(w)
    return pack_int4(codes.to(torch.uint8)), scale, zero.to(torch.uint8)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    codes = unpack_int4(packed).to(dtype)
    rows = codes.size(0)
    groups = codes.view(rows, -1, group_size) - zero.to(dtype)[..., None]
    return (groups * scale.to(dtype)[..., None]).view(rows, -1)


def pack_int4(codes: Tensor) -> Tensor:
    """``[out, in]`` codes 0..15 -> ``[out, in / 2]`` bytes, the even column in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.size(0), -1)


def check_group_size(in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise CpmliveError(f"group size {group_size} does not divide a layer's {in_features} inputs")


def int4_scales_and_zeros(scale: Tensor, zero: Tensor) -> Tensor:
    """Our (scale, integer zero) as int4pack's ``[groups, out, 2]`` (scale, float zero point)."""
    float_zero = (INT4PACK_OFFSET - zero.float()) * scale
    return torch.stack([scale, float_zero], dim=-1).transpose(0, 1).contiguous()


def fbgemm_pack_int8(codes: Tensor, scale: Tensor) -> object:
    """fbgemm's packed copy of int8 codes with per-row scales (the quantized tensor type it reads
    is deprecated in torch, with a warning that says nothing to our users: hidden here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(codes, scale.double(),
                                                          torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def fbgemm_matmul_per_token(x: Tensor, packed: object) -> Tensor:
    """``x @ w.T`` by fbgemm's dynamic int8 product with each row's own scale: fbgemm quantizes
    its whole input on one grid, so every row is first divided by its absolute maximum (all
    rows then share the grid a per-token quantizer would give each) and the outputs are scaled
    back. ``reduce_range``: 7-bit inputs, which AVX2's u8 x s8 pair products need to not
    saturate."""
    rows = x.reshape(-1, x.size(-1)).float()
    peak = rows.abs().amax(dim=1, keepdim=True).clamp(min=MIN_SCALE)
    out = torch.ops.quantized.linear_dynamic((rows / peak).contiguous(), packed, True).mul_(peak)
    return out.view(*x.shape[:-1], -1)


def int8_matmul_per_token(x: Tensor, codes_t: Tensor, weight_scale: Tensor) -> Tensor:
    """``x @ w.T`` with ``x`` quantized to int8 per row (absmax / 127) and ``w = codes * scale``;
    ``codes_t`` is the ``[in, out]`` transpose of the codes, as ``torch._int_mm`` reads it."""
    rows = x.reshape(-1, x.size(-1)).float()
    x_scale = (rows.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=MIN_SCALE)
    x_codes = torch.round(rows / x_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    out = torch._int_mm(x_codes, codes_t).float().mul_(x_scale).mul_(weight_scale)
    return out.view(*x.shape[:-1], -1)


# ---- layers -----------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A bias-free linear layer over int8 or int4 codes (the ``weight`` buffers above).

    Products with a gradient to pass back (a LoRA adapter trained on top, as QLoRA does) use the
    dequantized weight; inference uses the fastest product this CPU has for the format, as
    ``benchmarks/quant_kernels.py`` measures them: up to ``native.MAX_ROWS`` rows (decoding),
    our own loops over the codes as stored (:mod:`cpmlive.model.runtime.native`); beyond that, or
    without a C compiler, int8 with int8 inputs -> fbgemm's dynamic product (by far the fastest
    of torch's int8 paths on x86) and weight-only int8 / int4 -> torch's ``_weight_int8pack_mm``
    / ``_weight_int4pack_mm_for_cpu`` up to ``PACKED_KERNEL_MAX_ROWS`` rows, the dequantized
    weight and ``F.linear`` beyond.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activations = config.bits, config.group_size, config.activations
        if self.bits == 8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        else:
            check_group_size(in_features, self.group_size)
            groups = in_features // self.group_size
            self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
            self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8,
                                                            device=device))
        self._kernel_copy: tuple[tuple[int, ...], Tensor] | None = None

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"activations={self.activations}")

    @torch.no_grad()
    def set_codes(self, codes: Tensor, scale: Tensor, zero: Tensor | None = None) -> None:
        """Adopt codes (int8 ``[out, in]``, or packed int4 with its zero points) and scales."""
        self.weight = codes.to(self.weight.dtype).contiguous()
        self.weight_scale = scale.float().contiguous()
        if zero is not None:
            self.weight_zero = zero.to(torch.uint8).contiguous()
        self._kernel_copy = None

    def layer_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size if self.bits == 4 else None,
                           activations=self.activations)

    def adopt_codes(self, other: "QuantizedLinear") -> None:
        """Share ``other``'s codes and scales (no copy), e.g. when a LoRA layer wraps it."""
        for name, buffer in other.named_buffers(recurse=False):
            setattr(self, name, buffer)
        self._kernel_copy = None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.bits == 8:
            return dequantize_int8(self.weight, self.weight_scale, dtype)
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size, dtype)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.buffers()) + tuple(id(t) for t in self.buffers())

    def _kernel_weight(self) -> Tensor:
        """The in-memory copy a kernel reads (never saved), made once per set of codes."""
        versions = self._versions()
        if self._kernel_copy is None or self._kernel_copy[0] != versions:
            if self.bits == 4 and self.group_size not in INT4PACK_GROUPS:
                copy = None  # no kernel for this group size: products dequantize
            elif self.bits == 4:
                codes = unpack_int4(self.weight).to(torch.int32)
                copy = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4PACK_INNER_TILES)
                self._scales_and_zeros = int4_scales_and_zeros(self.weight_scale, self.weight_zero)
            elif self.activations == "int8":
                copy = fbgemm_pack_int8(self.weight, self.weight_scale) if FBGEMM else self.weight.t().contiguous()
            else:
                copy = self.weight
            self._kernel_copy = (versions, copy)
        return self._kernel_copy[1]

    def forward(self, x: Tensor) -> Tensor:
        if self._native_applies(x):
            return self._native(x).to(x.dtype)
        rows = x.numel() // self.in_features
        exact_path = self.activations == "none" and rows > PACKED_KERNEL_MAX_ROWS
        autograd = torch.is_grad_enabled() and x.requires_grad
        weight = None if x.device.type != "cpu" or autograd or exact_path else self._kernel_weight()
        if weight is None:
            return F.linear(x, self.dequantized(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if self.bits == 4:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.float().contiguous(), weight, self.group_size,
                                                              self._scales_and_zeros)
        elif self.activations == "int8":
            out = (fbgemm_matmul_per_token(flat, weight) if FBGEMM
                   else int8_matmul_per_token(flat, weight, self.weight_scale))
        else:
            out = torch._weight_int8pack_mm(flat.float().contiguous(), weight, self.weight_scale)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def native_layout(self) -> bool:
        """Whether the codes are laid out as the native products read them (CPU, contiguous,
        float32 scales: a checkpoint loaded in another dtype casts its scales too)."""
        buffers = [self.weight, self.weight_scale] + ([self.weight_zero] if self.bits == 4 else [])
        layout = all(t.device.type == "cpu" and t.is_contiguous() for t in buffers)
        codes = torch.int8 if self.bits == 8 else torch.uint8
        dtypes = self.weight.dtype == codes and self.weight_scale.dtype == torch.float32 and (
            self.bits == 8 or self.weight_zero.dtype == torch.uint8)
        return layout and dtypes and (self.bits == 8 or native.int4_supported(self.group_size))

    def _native_applies(self, x: Tensor) -> bool:
        """Our loops for a few rows; for weight-only int8 up to ``INT8_NATIVE_MAX_ROWS`` (a prompt),
        where PyTorch's exact path would first turn the whole weight into floats."""
        weight_only_int8 = self.bits == 8 and self.activations == "none"
        limit = INT8_NATIVE_MAX_ROWS if weight_only_int8 else native.MAX_ROWS
        return x.size(-1) == self.in_features and native.applies(x, limit) and self.native_layout()

    def _native(self, x: Tensor) -> Tensor:
        if self.bits == 8:
            return native.matvec_int8(x, self.weight, self.weight_scale, self.activations == "int8")
        return native.matvec_int4(x, self.weight, self.weight_scale, self.weight_zero, self.group_size)


class QuantizedEmbedding(QuantizedLinear):
    """The tied input embedding / output head in int8, one scale per vocabulary row:
    ``forward`` looks rows up, :meth:`head` is the output product."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: QuantConfig,
                 device: torch.device | str | None = None) -> None:
        table = QuantConfig(bits=8, activations=config.activations)
        super().__init__(embedding_dim, num_embeddings, table, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float() * self.weight_scale[ids, None]

    def head(self, hidden: Tensor) -> Tensor:
        return QuantizedLinear.forward(self, hidden)


# ---- whole models -----------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """The model's weights, a quantized layer's int8 / packed int4 codes counted as the
    ``in x out`` weights they stand for (its scales and zero points not at all)."""
    floats = sum(p.numel() for p in model.parameters())
    return floats + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))



def quantizable_linears(model: nn.Module) -> list[str]:
    """Every bias-free linear layer of the blocks (``model.block_lists``): q, k, v, attention
    output and the FFN."""
    lists = tuple(f".{name}." for name in getattr(model, "block_lists", ("layers",)))
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.bias is None and any(p in f".{name}" for p in lists)]



def install_quantized_layers(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the float layers ``config`` quantizes for empty quantized ones on the same device
    (a checkpoint's codes are loaded into them; ``cpmlive.compress`` sets them from weights)."""
    for path in quantizable_linears(model):
        linear = model.get_submodule(path)
        replace_submodule(model, path, QuantizedLinear(linear.in_features, linear.out_features, config,
                                              device=linear.weight.device))
    if config.embedding:
        table = model.input_embedding
        model.input_embedding = QuantizedEmbedding(table.num_embeddings, table.embedding_dim, config,
                                                   device=table.weight.device)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def dequantize_state(state: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A float state dict from a quantized one (each ``weight`` + ``weight_scale`` [+ ``weight_zero``]
    becomes one float ``weight``); the float tensors are kept as they are."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".weight_scale", ".weight_zero")):
            continue
        scale = state.get(f"{name}_scale")
        if scale is None:
            out[name] = tensor
        elif tensor.dtype == torch.int8:
            out[name] = dequantize_int8(tensor, scale, dtype)
        else:
            zero = state[f"{name}_zero"]
            group_size = 2 * tensor.size(1) // zero.size(1)
            out[name] = dequantize_int4(tensor, scale, zero, group_size, dtype)
    return out


__all__ = ["QuantizedEmbedding", "QuantizedLinear", "count_parameters", "dequantize_int4", "dequantize_int8",
           "dequantize_state", "install_quantized_layers", "int4_codes", "int4_group_params", "int8_matmul_per_token",
           "is_quantized", "pack_int4", "quantizable_linears", "quantize_int4", "quantize_int8", "unpack_int4"]
