"""``Int8Linear``: the W8A8 replacement of a bias-free ``nn.Linear``.

Shape legend: M = tokens, K = in_features, N = out_features.
"""
from __future__ import annotations

import torch
from torch import nn

from cloudmatrix.quant.primitives import quantize_tokens, quantize_weight, w8a8_matmul


def int8_linear_state(w: torch.Tensor, smooth: torch.Tensor | None = None,
                      clip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The buffers of an Int8Linear for float weight w [N, K], smoothing factors [K], clip ratios [N]."""
    smooth = torch.ones(w.shape[1]) if smooth is None else smooth.float()
    w_int8, w_scale = quantize_weight(w.detach().float() * smooth, clip)
    return {"weight": w_int8, "weight_scale": w_scale, "smooth_scale": smooth}


class Int8Linear(nn.Module):
    """y = dequant(int8(x / smooth_scale) @ weight^T): int8 weight per output channel, int8 tokens.

    Buffers (the checkpoint keys under the module's name): ``weight`` int8 [N, K], ``weight_scale``
    fp32 [N], ``smooth_scale`` fp32 [K] (ones when smoothing is off). The weight stored is the
    quantized W * smooth_scale, so the product equals x @ W^T up to rounding.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("smooth_scale", torch.ones(in_features))

    @classmethod
    def from_float(cls, w: torch.Tensor, smooth: torch.Tensor | None = None,
                   clip: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a float weight [N, K] with optional smoothing factors [K] and clip ratios [N]."""
        layer = cls(w.shape[1], w.shape[0])
        layer.load_state_dict(int8_linear_state(w, smooth, clip))
        return layer

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., K] float -> (x_int8 [M, K], scale [M]): the tokens this layer multiplies."""
        return quantize_tokens(x.reshape(-1, self.in_features).float() / self.smooth_scale)

    def matmul_quantized(self, x_int8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """Already quantized tokens x_int8 [M, K], x_scale [M] -> fp32 [M, N]."""
        return w8a8_matmul(x_int8, x_scale, self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N] fp32
        y = self.matmul_quantized(*self.quantize_input(x))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"
