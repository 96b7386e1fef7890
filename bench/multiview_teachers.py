"""Time and memory of one MVDream / ND-MV teacher call at full size (random weights).

    python -m bench.multiview_teachers --model mvdream      [--objects 2] [--repeats 2]
    python -m bench.multiview_teachers --model richdreamer

One call is what a teacher runs per step with classifier-free guidance: objects x 4 views,
conditional and unconditional, in one batch (2 objects: 16 UNet samples) of 4 x 32 x 32
(MVDream: latents of 256 px renders; ND-MV: pixels), with camera rows from our cameras.
The released UNet configuration, randomly initialised, fp32, one torch thread unless
--threads. Prints build time, the time of each call (the first one included) and the
process's peak RSS. Run one model per process: the peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.rss import peak_rss_gib
from renderers.cameras import Cameras, CameraSampling, sample_cameras
from teachers import multiview_unet as mv
from teachers import mvdream, richdreamer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mvdream", "richdreamer"), required=True)
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    module = mvdream if args.model == "mvdream" else richdreamer
    t0 = time.perf_counter()
    unet = mv.MultiViewUNet.build(mv.unet_config(module.RELEASED)).requires_grad_(False).eval()
    build = time.perf_counter() - t0
    # the text encoder is not part of the call: conditioning is computed once per prompt
    den = mvdream.MultiViewDenoiser(unet, None, None, module.camera_condition)
    gen = torch.Generator().manual_seed(0)
    cams = sample_cameras(args.objects, CameraSampling(), gen)
    n = 2 * len(cams)  # conditional + unconditional
    x = torch.randn(n, 4, 32, 32, generator=gen)
    t = torch.full((n,), 500)
    cond = torch.randn(n, 77, module.RELEASED["context_dim"], generator=gen)
    cams = Cameras.cat([cams, cams])
    times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            t1 = time.perf_counter()
            den(x, t, cond, cams)
            times.append(time.perf_counter() - t1)
    report = dict(
        model=args.model,
        unet_samples=n,
        shape=[4, 32, 32],
        parameters_m=round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        build_s=round(build, 2),
        call_s=[round(s, 2) for s in times],
        peak_rss_gib=round(peak_rss_gib(), 2),
        threads=args.threads,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
