"""``drdm synthesize-pairs``: Algorithm 4, registration training triples (moving, fixed, field).

    drdm synthesize-pairs IN [IN ...] OUT --per-image N --t-prime-aug A --t-prime-syn B

I_mv = warp(I0, phi_aug) (phi_aug: Algorithm 2 on I0 with T'_aug); phi_syn = Algorithm 2 on I_mv
with T'_syn; I_fx = warp(I0, compose(first=phi_syn, then=phi_aug)), so fixed(x) ~= moving(x +
phi_syn(x)): ``ddfs/*_ddf.nii.gz`` is the field that warps the moving image onto the fixed one.
Options, safety rules, manifest and --resume/--shard/--reproduce are those of ``drdm augment``.
"""
from __future__ import annotations

from .augment import EPILOG, add_common, run_mode


def add_parser(sub):
    p = sub.add_parser("synthesize-pairs", help="Algorithm 4: registration triples (moving, fixed, field) + labels",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG)
    add_common(p)
    p.add_argument("--t-prime-aug", default="45", help="T' SPEC of phi_aug, which makes the moving image (default 45)")
    p.add_argument("--t-prime-syn", default="45", help="T' SPEC of phi_syn, the stored field (default 45)")
    return p


def run(args) -> int:
    return run_mode(args, {"mode": "pairs", "t_prime": args.t_prime_aug, "t_prime_syn": args.t_prime_syn})
