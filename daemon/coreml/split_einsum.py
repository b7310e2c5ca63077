"""Split-einsum attention: the UNet's attention in the (B, C, 1, S) layout, one einsum per head.

The Neural Engine runs 4-D channels-first tensors and small per-head matrix products best; this is
the idea of Apple's `split_einsum` variant. Here it is an attention processor for diffusers' own
UNet that reuses its weights (the projections become 1×1 convolutions); the rest of each
transformer block (norms, feed-forward) keeps diffusers' (B, S, C) layout, unlike Apple's full
rewrite of the UNet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _conv(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """A linear layer over the channels of a (B, C, 1, S) tensor, as a 1×1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class SplitEinsumAttention:
    """A diffusers attention processor computing the same attention per head in (B, C, 1, S)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("split_einsum supports Stable Diffusion's UNet attention only; convert with --attention original")
        x = hidden_states.transpose(1, 2).unsqueeze(2)
        context = x if encoder_hidden_states is None else encoder_hidden_states.transpose(1, 2).unsqueeze(2)
        q, k, v = _conv(x, attn.to_q), _conv(context, attn.to_k), _conv(context, attn.to_v)
        head = q.shape[1] // attn.heads
        outputs = []
        for qh, kh, vh in zip(q.split(head, 1), k.split(head, 1), v.split(head, 1)):
            weights = torch.einsum("bcxq,bcxk->bkxq", qh, kh).mul(attn.scale).softmax(dim=1)
            outputs.append(torch.einsum("bkxq,bcxk->bcxq", weights, vh))
        out = _conv(torch.cat(outputs, dim=1), attn.to_out[0])
        out = out.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def apply(unet: torch.nn.Module) -> None:
    """Make every attention layer of a diffusers UNet use split-einsum attention."""
    unet.set_attn_processor(SplitEinsumAttention())
