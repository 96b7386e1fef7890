"""What the student's VAE decode keeps for its backward, per plane, from tensor sizes
alone: the SD 2.1 student is built on the meta device (no memory, no compute) and the
bytes of every tensor autograd saves are summed, for the whole decode and for each of the
segments the decoder's own gradient checkpointing recomputes (mid-block, each up-block,
and the unsegmented tail: norm, activation, new conv_out).

    python -m bench.decode_saved [--dtype fp32|bf16]

Multiply by the planes a segment holds (12 at batch 2) for the backward's share: the
largest segment decides the peak (``student.decode_chunk``, docs/full_size.md).
"""

from __future__ import annotations

import argparse

import torch

from prd.student import StudentConfig, build_student

GIB = 2**30


def saved_gib(fn) -> float:
    """GiB of the distinct tensors autograd saves while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t._cdata] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    student = build_student(StudentConfig(arch="sd21"), device="meta", dtype=dtype)
    x0 = torch.zeros(1, 4, 32, 32, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        print(f"whole decode: {saved_gib(lambda: student._decode_planes(x0)):.3f} GiB / plane")
        dec = student.decoder
        h = dec.conv_in(student.post_quant_conv(x0.to(dtype)))
        for name, block in [("mid_block", dec.mid_block), *(
            (f"up_blocks.{i}", b) for i, b in enumerate(dec.up_blocks)
        )]:  # fmt: skip
            gib = saved_gib(lambda b=block, h=h: b(h))
            h = block(h)
            print(f"  {name:12s} -> {tuple(h.shape[1:])}: {gib:.3f} GiB / plane")
        tail = saved_gib(lambda: dec.conv_out(dec.conv_act(dec.conv_norm_out(h))))
        print(f"  {'tail':12s}: {tail:.3f} GiB / plane")


if __name__ == "__main__":
    main()
