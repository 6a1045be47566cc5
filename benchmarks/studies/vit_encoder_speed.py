"""How fast Vision Transformer tile encoders (pathology foundation model sizes) run here.

spotlens reads timm-format ViT checkpoints (``get_encoder("vit", weights=...)``). No such
weights are available on this machine, so this times the same architectures with random
weights (speed does not depend on the values): ViT-B/16 (Phikon's size) and ViT-L/16 with
layer scale (UNI's size), 224-px tiles, against EfficientNet-Lite0 (the default encoder).

Run:  python benchmarks/studies/vit_encoder_speed.py [--tiles N] [--out FILE]
Writes benchmarks/studies/results/vit_encoder_speed.md. A study (it builds ViTs of the
pathology models' sizes from spotlens' private ``_vit`` module).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from spotlens.histology._encoders import get_encoder
from spotlens.histology._vit import VisionTransformerFeatures, ViTConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared helper benchmarks/_machine.py, not spotlens
from _machine import machine, write_atomic  # noqa: E402
HER2ST_TILES = 3579  # her2st's 1,193 spots at 3 tile scales

ARCHITECTURES = {
    "ViT-B/16 (Phikon's size)": ViTConfig(dim=768, depth=12, num_heads=12, patch_size=16,
                                          grid=14, mlp_hidden=3072),
    "ViT-L/16 + layer scale (UNI's size)": ViTConfig(dim=1024, depth=24, num_heads=16,
                                                     patch_size=16, grid=14, mlp_hidden=4096,
                                                     layer_scale=True),
}


def tiles_per_second(module, n_tiles: int, batch: int = 16) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        module(x[:2])  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n_tiles:
            module(x)
            done += batch
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=48, help="tiles timed per encoder")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vit_encoder_speed.md")
    args = parser.parse_args(argv)
    rows = []
    lite0 = get_encoder("efficientnet-lite0").module
    for name, module in [("EfficientNet-Lite0 (default)", lite0),
                         *((k, VisionTransformerFeatures(c).eval())
                           for k, c in ARCHITECTURES.items())]:
        rate = tiles_per_second(module, args.tiles)
        rows.append((name, rate, HER2ST_TILES / rate / 60))
        print(f"{name}: {rate:.1f} tiles/s, her2st (3 scales) {rows[-1][2]:.1f} min", flush=True)
    lines = [
        "# Tile encoder speed on CPU: EfficientNet-Lite0 and ViT sizes of pathology models", "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "- command: `python benchmarks/studies/vit_encoder_speed.py`",
        "- ViTs with random weights (speed does not depend on them); 224-px tiles, batches of "
        "16, inference mode; her2st = 1,193 spots × 3 tile scales = 3,579 tiles, encoded once "
        "and then read from the feature cache.", "",
        "| encoder | tiles/s | her2st tiles at 3 scales, min |", "|---|---:|---:|",
        *(f"| {n} | {r:.1f} | {m:.1f} |" for n, r, m in rows), "",
    ]
    out = write_atomic(args.out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
