"""Training throughput of the trainer's step against a bare hand-written PyTorch loop, same run.

    python benchmarks/train_throughput.py [--arch resnet8] [--batch 64] [--repeats 5] [--epochs 2] [--device auto]

Both arms train the same model (same initial weights), on the same data source and loader (same
batches, same on-device augmentation), with the same SGD settings, for ``--epochs`` epochs per repeat:
  * trainer: ``compressor.trainer.fit`` with the vanilla scheme; images/s of its training phase
    as it logs it (per-epoch validation and the final test pass are not part of the step);
  * bare:    ``for batch in loader: loss = CE(model(x), y); zero_grad; backward; step``.
Cases: 3x32x32 (CIFAR-sized random images, 10 classes) and the bundled digits (1x8x8).
Repeats alternate which arm goes first; the table shows medians and the median of the per-repeat
ratios (trainer / bare; 1.00 = no overhead).

Case ``kd``: what a user would otherwise write by hand. A distillation (``--kd-teacher`` ->
``--kd-student``, Hinton KD at the reference's weights: 0.9 KD at T = 4, 0.1 cross-entropy) on
synthetic CIFAR-100-shaped files (random images, written in torchvision's python format), three arms:
  * trainer: ``compressor.trainer.fit`` with the offline scheme on ``cifar100:DIR``;
  * floor:   the bare step (no-grad teacher forward, student forward/backward, SGD step) on the
             same batches from our loader;
  * hand:    the loop the field's reference code uses (RepDistiller's train_student.py/train_distill,
             written here from its protocol): a ``Dataset`` returning a PIL image per sample,
             ``torchvision.transforms`` RandomCrop(32, padding=4) / RandomHorizontalFlip / ToTensor /
             Normalize, a ``DataLoader`` with ``--workers`` worker processes, the teacher under
             ``no_grad``, the KD loss, loss.item() and top-1/top-5 every step.
Same pair, initial weights, batch, threads and SGD settings; images/s of the training epochs by the
wall clock (the workers run in other processes), ratios trainer / hand and trainer / floor; and the CPU
each arm spends per image (the hand loop's workers included), which a machine shared with other
processes does not blur as it blurs the wall clock.

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.data import load_source  # noqa: E402
from compressor.data.cifar import CIFAR100  # noqa: E402
from compressor.data.augment import CropFlip  # noqa: E402
from compressor.data.base import SplitOptions  # noqa: E402
from compressor.data.memory import InMemorySource  # noqa: E402
from compressor.models import create  # noqa: E402
from compressor.knowledge.spec import parse_method_spec  # noqa: E402
from compressor.schemes import Vanilla  # noqa: E402
from compressor.schemes.offline import Offline, freeze  # noqa: E402
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
    precision = resolve_precision(cfg, device, net, source.input_shape)  # the trainer's AMP / channels_last choice
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


# ---------------------------------------------------------------- case kd: against the hand-written loop

KD_TEMPERATURE, KD_WEIGHT, CE_WEIGHT = 4.0, 0.9, 0.1  # RepDistiller's KD row: --kd_T 4 -r 0.1 -a 0.9


def write_cifar100(folder: Path, n_train: int, n_test: int = 256, seed: int = 0) -> Path:
    """Random images in torchvision's CIFAR-100 python format (DIR/cifar-100-python/{train,test,meta})."""
    rng = torch.Generator().manual_seed(seed)
    root = folder / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8, generator=rng).numpy()
        labels = torch.randint(0, 100, (n,), generator=rng).tolist()
        (root / name).write_bytes(pickle.dumps({"data": data, "fine_labels": labels,
                                                "coarse_labels": [c // 5 for c in labels]}))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


class PilCifar(torch.utils.data.Dataset):
    """The reference code's dataset: uint8 HWC arrays in memory, one PIL image per sample, transforms."""

    def __init__(self, folder: Path, transform) -> None:
        entry = pickle.loads((folder / "cifar-100-python" / "train").read_bytes())  # our own file
        self.data = entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision keeps it
        self.targets = list(entry["fine_labels"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index], index


def kd_loss(logit_s: torch.Tensor, logit_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE + KD as the reference weighs them (its DistillKL: KL(p_t || p_s) * T^2 / batch)."""
    t = KD_TEMPERATURE
    kd = F.kl_div(F.log_softmax(logit_s / t, dim=1), F.softmax(logit_t / t, dim=1), reduction="sum") * t**2
    return CE_WEIGHT * F.cross_entropy(logit_s, y) + KD_WEIGHT * kd / logit_s.shape[0]


def kd_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def kd_trainer_arm(teacher, student, source, args, seed) -> tuple[float, float]:
    """(images/s of the training epochs as the trainer logs them, CPU ms per training image of the
    whole ``fit`` call: set-up, validation and the final test pass included, so an upper bound)."""
    spec = parse_method_spec("hinton")
    c, h, w = source.input_shape
    cpu0 = time.process_time()
    scheme = Offline(copy.deepcopy(teacher), copy.deepcopy(student), spec.terms, input_shape=(c, h, w),
                     num_classes=source.num_classes, num_train=source.split_size("train"), ce_weight=spec.ce_weight)
    result = fit(scheme, source, kd_config(args, seed))
    cpu = time.process_time() - cpu0
    images = sum(r["images_per_s"] * r["train_time_s"] for r in result.history)
    return images / sum(r["train_time_s"] for r in result.history), 1e3 * cpu / images


def kd_floor_arm(teacher, student, source, args, seed) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the bare step on our loader's batches."""
    cfg = kd_config(args, seed)
    device = resolve_device(args.device)
    t_net, s_net = freeze(copy.deepcopy(teacher)).to(device), copy.deepcopy(student).to(device).train()
    opt = kd_optimizer(s_net, cfg)
    images, elapsed, cpu0 = 0, 0.0, time.process_time()
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        for batch in source.loader("train", cfg.batch_size, shuffle=True, augment=True, seed=seed, epoch=epoch):
            with torch.no_grad():
                logit_t = t_net(batch.x)
            loss = kd_loss(s_net(batch.x), logit_t, batch.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += batch.y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
    return images / elapsed, 1e3 * (time.process_time() - cpu0) / images


def kd_hand_arm(teacher, student, folder: Path, args, seed) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the hand-written loop, the CPU of the main process and of its
    DataLoader workers together (they exit at each epoch's end, so their time is counted)."""
    import resource

    from torchvision import transforms

    cfg = kd_config(args, seed)
    device = resolve_device(args.device)
    train_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100.mean, CIFAR100.std),
    ])
    loader = torch.utils.data.DataLoader(PilCifar(folder, train_transform), batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=args.workers)
    t_net, s_net = copy.deepcopy(teacher).to(device).eval(), copy.deepcopy(student).to(device)
    opt = kd_optimizer(s_net, cfg)
    torch.manual_seed(seed)
    images, elapsed = 0, 0.0
    cpu0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(cfg.epochs):
        s_net.train()
        t_net.eval()
        start = time.perf_counter()
        for x, y, _index in loader:
            x, y = x.float().to(device), y.to(device)
            logit_s = s_net(x)
            with torch.no_grad():
                logit_t = t_net(x)
            loss = kd_loss(logit_s, logit_t, y)
            top5 = logit_s.topk(5, dim=1).indices == y[:, None]  # the reference's accuracy(), every step
            _log = (loss.item(), top5[:, 0].float().mean().item(), top5.any(dim=1).float().mean().item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            images += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = children.ru_utime + children.ru_stime - cpu0[1].ru_utime - cpu0[1].ru_stime
    return images / elapsed, 1e3 * (time.process_time() - cpu0[0] + workers) / images


def kd_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    # random labels: nothing to learn, so the guard that stops a run at chance level is off
    return TrainConfig(epochs=args.kd_epochs, batch_size=args.batch, lr=0.05, schedule="constant", nesterov=False,
                       weight_decay=5e-4, seed=seed, device=args.device, progress="off", stop_when_not_learning=False)


def bench_kd(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    teacher = create(args.kd_teacher, num_classes=100).eval()
    student = create(args.kd_student, num_classes=100)
    with tempfile.TemporaryDirectory(prefix="kd_throughput_") as tmp:
        folder = write_cifar100(Path(tmp), args.kd_samples, n_test=64)
        source = load_source(f"cifar100:{folder}", val_fraction=0.02, device=device)
        arms = {"trainer": lambda seed: kd_trainer_arm(teacher, student, source, args, seed),
                "floor": lambda seed: kd_floor_arm(teacher, student, source, args, seed),
                "hand": lambda seed: kd_hand_arm(teacher, student, folder, args, seed)}
        for arm in arms.values():  # warm-up: allocator, kernels, lazy imports, worker start-up code
            arm(0)
        ips: dict[str, list[float]] = {name: [] for name in arms}
        cpu: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[: r % 3]:  # each arm takes each place in turn
                rate, ms = arms[name](r + 1)
                ips[name].append(rate)
                cpu[name].append(ms)
            print(f"  kd repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{n} {ips[n][-1]:.1f} img/s {cpu[n][-1]:.2f} CPU ms/img" for n in names), flush=True)
    med = {name: statistics.median(v) for name, v in ips.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    per_repeat = list(zip(ips["trainer"], ips["hand"], ips["floor"]))
    return {
        "case": "kd", "input": "3x32x32", "teacher": args.kd_teacher, "student": args.kd_student, "batch": args.batch,
        "train_images": source.split_size("train"), "hand_images": args.kd_samples, "workers": args.workers,
        "repeats": args.repeats, "epochs": args.kd_epochs, "trainer_ips": med["trainer"], "floor_ips": med["floor"],
        "hand_ips": med["hand"], "samples": ips, "cpu_ms_per_image": med_cpu, "cpu_samples": cpu,
        "trainer_vs_hand": statistics.median(t / h for t, h, _ in per_repeat),
        "trainer_vs_floor": statistics.median(t / f for t, _, f in per_repeat),
        "hand_vs_floor": statistics.median(h / f for _, h, f in per_repeat),
        "hand_cpu_vs_trainer_cpu": med_cpu["hand"] / med_cpu["trainer"],
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
    parser.add_argument("--cases", default="3x32x32,digits,kd")
    parser.add_argument("--kd-teacher", default="resnet56")
    parser.add_argument("--kd-student", default="resnet20")
    parser.add_argument("--kd-samples", type=int, default=1536, help="training images of the kd case")
    parser.add_argument("--kd-epochs", type=int, default=1, help="epochs per arm and repeat in the kd case")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the hand-written loop")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sources = {"3x32x32": lambda: cifar_sized(args.samples, device),
               "digits": lambda: load_source("digits", device=device)}
    rows = []
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, arch {args.arch}, "
          f"batch {args.batch}, {args.repeats} repeats")
    cases = args.cases.split(",")
    vanilla = [c for c in cases if c != "kd"]
    if vanilla:
        print(f"{'case':<9} {'input':<8} {'trainer img/s':>14} {'bare img/s':>11} {'ratio':>6}")
    for case in vanilla:
        row = bench(case, sources[case](), args)
        rows.append(row)
        print(f"{case:<9} {row['input']:<8} {row['trainer_ips']:>14.0f} {row['bare_ips']:>11.0f} {row['ratio']:>6.3f}")
    if "kd" in cases:
        print(f"kd: {args.kd_teacher} -> {args.kd_student}, Hinton KD, batch {args.batch}, {args.kd_samples} images, "
              f"{args.kd_epochs} epoch(s) per arm, hand-written loop with {args.workers} DataLoader workers")
        row = bench_kd(args, device)
        rows.append(row)
        print(f"{'floor img/s':>12} {'hand img/s':>11} {'trainer img/s':>14} {'trainer/hand':>13} {'trainer/floor':>14}")
        print(f"{row['floor_ips']:>12.1f} {row['hand_ips']:>11.1f} {row['trainer_ips']:>14.1f} "
              f"{row['trainer_vs_hand']:>13.3f} {row['trainer_vs_floor']:>14.3f}")
        cpu = row["cpu_ms_per_image"]
        print(f"CPU ms per image: floor {cpu['floor']:.2f}, hand {cpu['hand']:.2f} (main process and DataLoader "
              f"workers), trainer {cpu['trainer']:.2f} (the whole fit call: set-up, validation, test included)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "device": str(device),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
