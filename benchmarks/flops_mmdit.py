"""FLOPs of one SD3 / FLUX transformer call (batch 1, the empty-prompt conditioning's token counts) at a given
image size, counted with torch.utils.flop_counter on the meta device from the released configs (no weights):
issue 28's cost row. Through EmerDiff's own processors (MMDiTAttnProcessor, attention sharing off), as the
pipeline calls them.

    .venv/bin/python benchmarks/flops_mmdit.py [--resolution 1024 512]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch


def transformer_flops(family: str, resolution: int, config: dict | None = None) -> float:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from emerdiff.method.attention import AttentionController, controlled_attention
    from emerdiff.sd import mmdit

    cls, cfg = ((SD3Transformer2DModel, mmdit.SD3_MEDIUM_TRANSFORMER_CONFIG) if family == "sd3"
                else (FluxTransformer2DModel, mmdit.FLUX_DEV_TRANSFORMER_CONFIG))
    with torch.device("meta"):
        transformer = cls(**(config or cfg)).eval()
        c = transformer.config
        text = 77 + mmdit.T5_MAX_LENGTH["sd3"] if family == "sd3" else mmdit.T5_MAX_LENGTH["flux"]
        pooled = torch.zeros(1, c.pooled_projection_dim)
        model = SimpleNamespace(family=family, unet=transformer, guidance=mmdit.FLUX_GUIDANCE,
                                empty_embedding=torch.zeros(1, text, c.joint_attention_dim), empty_pooled=pooled)
        lat = resolution // 8
        x = torch.zeros(1, 16, lat, lat)
        with torch.no_grad(), controlled_attention(transformer, AttentionController()), \
                FlopCounterMode(display=False) as counter:
            mmdit.mmdit_forward(model, x, 500)  # type: ignore[arg-type]
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 512])
    args = parser.parse_args()
    for family, name in (("sd3", "SD3-medium"), ("flux", "FLUX.1-dev")):
        for res in args.resolution:
            print(f"{name:11s} {res:5d} px: {transformer_flops(family, res) / 1e12:6.2f} TFLOP per call")


if __name__ == "__main__":
    main()
