"""Training throughput of the trainer's step against a bare hand-written PyTorch loop, same run.

    python benchmarks/train_throughput.py [--arch resnet8] [--batch 64] [--repeats 5] [--epochs 2] [--device auto]

Both arms train the same model (same initial weights), on the same data source and loader (same
batches, same on-device augmentation), with the same SGD settings, for ``--epochs`` epochs per repeat:
  * trainer: ``compressor.trainer.fit`` with the vanilla scheme; images/s of its training phase
    as it logs it (per-epoch validation and the final test pass are not part of the step);
  * bare:    ``for batch in loader: loss = CE(model(x), y); zero_grad; backward; step``.
Cases: 3x32x32 (CIFAR-sized random images, 10 classes) and the bundled digits (1x8x8).
Repeats alternate which arm goes first; the table shows medians and the median of the per-repeat
ratios (trainer / bare; 1.00 = no overhead). Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.data import load_source  # noqa: E402
from compressor.data.augment import CropFlip  # noqa: E402
from compressor.data.base import SplitOptions  # noqa: E402
from compressor.data.memory import InMemorySource  # noqa: E402
from compressor.models import create  # noqa: E402
from compressor.schemes import Vanilla  # noqa: E402
from compressor.trainer import TrainConfig, fit, resolve_device  # noqa: E402
from compressor.trainer.precision import resolve_precision  # noqa: E402


def cifar_sized(n_train: int, device: torch.device) -> InMemorySource:
    """Random 3x32x32 uint8 images with CIFAR's augmentation (pad 4 crop + flip)."""
    gen = torch.Generator().manual_seed(0)
    n_val, n_test = 64, 64
    n = n_train + n_val + n_test
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    rows = {"train": torch.arange(n_train), "val": torch.arange(n_train, n_train + n_val),
            "test": torch.arange(n_train + n_val, n)}
    return InMemorySource(
        spec="synthetic-3x32x32", name="synthetic", images=images, rows=rows,
        labels={s: labels[r] for s, r in rows.items()}, class_names=[str(c) for c in range(10)],
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augmentation=CropFlip(pad=4, flip=True),
        options=SplitOptions(), device=device,
    )


def config_for(args: argparse.Namespace, epoch_seed: int) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch, lr=0.01, schedule="constant", nesterov=True,
                       weight_decay=5e-4, seed=epoch_seed, device=args.device, progress="off")


def trainer_arm(model, source, args, seed) -> float:
    result = fit(Vanilla(copy.deepcopy(model)), source, config_for(args, seed))
    images = sum(r["images_per_s"] * r["train_time_s"] for r in result.history)
    return images / sum(r["train_time_s"] for r in result.history)


def bare_arm(model, source, args, seed) -> float:
    cfg = config_for(args, seed)
    device = resolve_device(args.device)
    net = copy.deepcopy(model).to(device)
    precision = resolve_precision(cfg, device, net)  # the same AMP / channels_last choice as the trainer
    precision.prepare_module(net)
    scaler = precision.grad_scaler()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    net.train()
    images, elapsed = 0, 0.0
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        for batch in source.loader("train", cfg.batch_size, shuffle=True, augment=True, seed=seed, epoch=epoch):
            x = precision.prepare_input(batch.x)
            with precision.autocast():
                loss = F.cross_entropy(net(x), batch.y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            images += batch.y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
    return images / elapsed


def bench(case: str, source, args) -> dict:
    c, h, w = source.input_shape
    torch.manual_seed(0)
    model = create(args.arch, num_classes=source.num_classes, in_chans=c)
    trainer_arm(model, source, args, 0)  # warm-up: allocator, kernels, lazy imports
    bare_arm(model, source, args, 0)
    t_ips, b_ips, ratios = [], [], []
    for r in range(args.repeats):
        arms = [("trainer", trainer_arm), ("bare", bare_arm)]
        if r % 2:
            arms.reverse()
        got = {name: fn(model, source, args, r + 1) for name, fn in arms}
        t_ips.append(got["trainer"])
        b_ips.append(got["bare"])
        ratios.append(got["trainer"] / got["bare"])
    return {
        "case": case, "input": f"{c}x{h}x{w}", "arch": args.arch, "batch": args.batch,
        "train_images": source.split_size("train"), "repeats": args.repeats, "epochs": args.epochs,
        "trainer_ips": statistics.median(t_ips), "bare_ips": statistics.median(b_ips),
        "ratio": statistics.median(ratios), "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per arm and repeat")
    parser.add_argument("--samples", type=int, default=2048, help="training images of the 3x32x32 case")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--cases", default="3x32x32,digits")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sources = {"3x32x32": lambda: cifar_sized(args.samples, device),
               "digits": lambda: load_source("digits", device=device)}
    rows = []
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, arch {args.arch}, "
          f"batch {args.batch}, {args.repeats} repeats")
    print(f"{'case':<9} {'input':<8} {'trainer img/s':>14} {'bare img/s':>11} {'ratio':>6}")
    for case in args.cases.split(","):
        row = bench(case, sources[case](), args)
        rows.append(row)
        print(f"{case:<9} {row['input']:<8} {row['trainer_ips']:>14.0f} {row['bare_ips']:>11.0f} {row['ratio']:>6.3f}")
    out = Path(__file__).parent / "results" / "train_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "device": str(device),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
