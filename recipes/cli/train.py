"""`kdcompress train`: train a teacher (or a vanilla student baseline) on its labels."""

from __future__ import annotations

import click

from recipes.cli._options import (LazyChoice, corruption_from_flags, corruption_options, data_option, positive_finite,
                                  threads_option)


def _optimizers() -> list[str]:
    from compressor.trainer.optim import OPTIMIZERS

    return sorted(OPTIMIZERS)


def _schedules() -> list[str]:
    from compressor.trainer.schedule import SCHEDULES

    return sorted(SCHEDULES)


def _amp_modes() -> tuple[str, ...]:
    from compressor.trainer.config import AMP_MODES

    return AMP_MODES


def _milestones(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 150,180,210") from None


@click.command("train")
@click.option("--arch", required=True, help="zoo architecture, e.g. resnet110, resnet8x4, wrn_40_2 (see `kdcompress zoo`)")
@data_option(default="digits")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the model file to write; its training state goes to OUTPUT.state, its metrics to OUTPUT.jsonl")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="default: the dataset's protocol")
@click.option("--lr", type=float, callback=positive_finite, default=None, help="initial learning rate")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="global batch (split over torchrun processes)")
@click.option("--optimizer", type=LazyChoice(_optimizers), default=None)
@click.option("--schedule", type=LazyChoice(_schedules), default=None)
@click.option("--milestones", callback=_milestones, default=None, help="step schedule: epochs at which lr is multiplied by gamma, e.g. 150,180,210")
@click.option("--gamma", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--momentum", type=click.FloatRange(min=0), default=None)
@click.option("--nesterov/--no-nesterov", default=None)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option("--grad-clip", type=click.FloatRange(min=0), default=None, help="clip the global gradient norm (0: off)")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="training data held out to pick the best epoch")
@click.option("--seed", type=int, default=0, show_default=True, help="fixes init, data order, augmentation and the val split")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
@click.option("--amp", type=LazyChoice(_amp_modes), default="auto", show_default=True, help="mixed precision (CUDA only)")
@click.option("--deterministic", is_flag=True, help="CUDA: deterministic kernels (slower)")
@click.option("--resume", is_flag=True, help="continue from OUTPUT.state (after the last finished epoch)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar and no per-epoch lines")
@threads_option
@corruption_options
def command(arch, data, output, epochs, lr, batch_size, optimizer, schedule, milestones, gamma, momentum, nesterov,
            weight_decay, warmup_epochs, label_smoothing, grad_clip, val_fraction, seed, device, amp, deterministic, resume,
            quiet, threads, label_noise, imbalance, imbalance_gamma) -> None:
    """Train ARCH on DATA with cross-entropy; the file written is a teacher for every later command.

    Under `torchrun --nproc_per_node N` it trains with distributed data parallel (gloo on CPU,
    NCCL on GPU); rank 0 writes the files. With --label-noise/--imbalance the teacher learns from
    the same seeded corrupted labels its students get from the same flags and --seed.
    """
    from compressor.threads import request
    from recipes.training import train_vanilla

    corruption = corruption_from_flags(label_noise, imbalance, imbalance_gamma)
    echo = None if quiet else (lambda line: click.echo(line, err=True))
    with request(threads):
        result = train_vanilla(
            arch, data, output, val_fraction=val_fraction, resume=resume, echo=echo, corruption=corruption,
            epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, schedule=schedule, milestones=milestones,
            gamma=gamma, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing, grad_clip=grad_clip, seed=seed, device=device, amp=amp,
            deterministic=deterministic or None, progress="off" if quiet else "auto",
        )
    if not result.is_main:
        return
    best = result.best_record
    chosen = (f"best epoch {result.best_epoch}/{result.config.epochs} by {result.select.replace('_', ' ')} "
              f"{best.get('val_top1', float('nan')):.2f}%" if result.select != "last" else "last epoch")
    if result.test is not None:
        click.echo(f"{arch} on {data}: test top-1 {result.test.top1:.2f}%  top-5 {result.test.top5:.2f}%  "
                   f"({result.test.count} images; {chosen})")
    click.echo(f"wrote {output}")
