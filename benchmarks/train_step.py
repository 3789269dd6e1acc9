"""Time one training step by part, in the default (NCHW / NCDHW) and channels-last layouts.

Builds the batch with ``training_batch`` (augmentation, forward sampler, warp) and scores it with
``loss_terms``, both from training/objective.py, as training/train.py does; then it times the
network's forward pass, the losses and the backward pass on the same batch in both layouts,
alternating which goes first, so that a drift in the machine's speed hits both alike.
Prints the median of each part per layout and the ratio of the medians.

    python -m training prepare --config training/configs/general3d.yaml      # once
    python benchmarks/train_step.py --config training/configs/general3d.yaml --steps 4 --threads 1
    python benchmarks/train_step.py --config training/configs/general3d.yaml --steps 3 --bf16   # + bf16 autocast
    python benchmarks/train_step.py --config training/configs/general3d.yaml --device cuda --batch 8 \
           --steps 10 --profile 3                       # on a GPU, + where the time goes, by operator

Needs the configuration's prepared data (``data.prepared``); ``--batch`` overrides
``train.batch_size``.  On a GPU the parts are timed with the device synchronised at every mark
(so they add up to the step, at the cost of the overlap the training loop would get), the bf16
arm uses CUDA autocast, and ``--profile N`` runs N more steps of the default arm under
``torch.profiler`` and prints the operators that took the most device (or, on the CPU, CPU) time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from napari_drdm.core.forward import ForwardSampler  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402
from training.data import SliceBank, dataset  # noqa: E402
from training.distributed import Env  # noqa: E402
from training.objective import loss_terms, training_batch  # noqa: E402
from training.settings import load_config, model_config  # noqa: E402
from training.streams import generators  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a training configuration (YAML)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per layout (after one warm-up each)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the configuration's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    ap.add_argument("--bf16", action="store_true",
                    help="add a third arm: channels-last under bf16 autocast (train.amp: bf16); on the CPU "
                         "oneDNN runs it on AMX / AVX-512-BF16 units where the CPU has them")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timing, profile N steps of the default arm and print the top operators")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    if args.profile < 0:
        raise SystemExit(f"--profile must be 0 or more, got {args.profile}")
    if args.device != "auto":                # "auto" is resolved by the training's own Env below
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise SystemExit(f"--device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: this PyTorch sees no CUDA device")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg["train"]["threads"] = args.threads
    batch = int(args.batch or cfg["train"]["batch_size"])
    mcfg = model_config(cfg)
    env = Env(dict(cfg["train"], device=args.device))
    dev = env.device
    try:
        data = dataset(cfg, env)
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"{args.config}: its prepared data cannot be read ({e}); run "
                         f"`python -m training prepare --config {args.config}` first") from None
    S, K = mcfg.size, mcfg.k_recursions
    lcfg = cfg["loss"]
    layout = torch.channels_last_3d if mcfg.ndim == 3 else torch.channels_last
    torch.manual_seed(0)
    base = DRDMNet.from_config(mcfg)
    nets = {"default": base}
    for name in ["channels_last"] + (["channels_last_bf16"] if args.bf16 else []):
        nets[name] = DRDMNet.from_config(mcfg)
        nets[name].load_state_dict(base.state_dict())
        nets[name] = nets[name].to(memory_format=layout)
    nets = {name: net.to(dev) for name, net in nets.items()}
    sampler = ForwardSampler(mcfg)
    bank = SliceBank(data["train"], batch, device=dev, seed=0)
    gens = generators(0, 0, dev)
    batch_parts = {p: [] for p in ("augment", "sampler", "warp")}
    times = {name: {p: [] for p in ("forward", "losses", "backward", "step")} for name in nets}

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    class Marks(list):
        """The list ``training_batch`` appends its time marks to, synchronising the device first."""

        def append(self, _value) -> None:
            super().append(now())

    def make_batch(record):
        marks = Marks([now()])
        _, t, fs, img_t = training_batch(bank, sampler, cfg["augment"], gens, mcfg, dev, marks,
                                        image_padding=lcfg["image_padding"])
        if record:
            for p, a, b in zip(batch_parts, marks, marks[1:]):
                batch_parts[p].append(b - a)
        return img_t, t, fs, marks[-1] - marks[0]

    def net_step(name, img_t, t, fs, prep_s, record):
        net = nets[name]
        t0 = now()
        x = img_t.contiguous(memory_format=layout) if name.startswith("channels_last") else img_t
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=name.endswith("bf16")):
            psi = net(x, t.to(dev), k=K)
        psi = psi.float()                    # the losses stay float32, as in training/train.py
        t1 = now()
        terms = loss_terms(psi, fs, S, lcfg)
        t2 = now()
        net.zero_grad(set_to_none=True)
        terms["total"].backward()
        t3 = now()
        if record:
            for p, v in zip(times[name], (t1 - t0, t2 - t1, t3 - t2, prep_s + t3 - t0)):
                times[name][p].append(v)

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"{args.config}: {mcfg.ndim}D S={S} batch {batch}, {where}, "
          f"{args.steps} timed steps, each batch through every arm in turn ({', '.join(nets)})", flush=True)
    for i in range(args.steps + 1):           # the first round warms up
        img_t, t, fs, prep_s = make_batch(i > 0)
        order = list(nets) if i % 2 == 0 else list(nets)[::-1]
        for name in order:
            net_step(name, img_t, t, fs, prep_s, i > 0)
    others = list(nets)[1:]
    print("| part | " + " | ".join(f"{n} s" for n in nets) + " | "
          + " | ".join(f"default / {n}" for n in others) + " |")
    print("| --- " * (1 + len(nets) + len(others)) + "|")
    for p, v in batch_parts.items():
        m = statistics.median(v)
        print(f"| {p} (batch, shared) | " + " | ".join(f"{m:.3f}" for _ in nets) + " | "
              + " | ".join("1.00" for _ in others) + " |")
    for p in ("forward", "losses", "backward", "step"):
        med = {n: statistics.median(times[n][p]) for n in nets}
        print(f"| {p} | " + " | ".join(f"{med[n]:.3f}" for n in nets) + " | "
              + " | ".join(f"{med['default'] / med[n]:.2f}" for n in others) + " |")
    print("step = batch preparation + forward + losses + backward (medians over the timed steps)")
    if args.profile:
        profile(args.profile, dev, lambda: net_step("default", *make_batch(False), False))
    return 0


def profile(n: int, dev: torch.device, one_step, rows: int = 20) -> None:
    """Run ``one_step`` ``n`` times under ``torch.profiler`` and print the operators that took the
    most time on the device (on the CPU: CPU time), self time, whole steps (batch included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(n):
            one_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {n} step(s) of the default arm, sorted by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


if __name__ == "__main__":
    raise SystemExit(main())
