"""`kdcompress distill`: one distillation run (offline, chain, DGKD, cohort, ModReduce, OSAKD, TCN)."""

from __future__ import annotations


import click

from compressor.errors import UserError
from recipes.cli._options import (LazyHelpOption, corruption_from_flags, corruption_options, data_option,
                                  positive_finite, threads_option, trust_option)
from recipes.request import DISTILL_SCHEMES, csv


def _aggregators() -> list[str]:
    from compressor.schemes.aggregators import list_aggregators

    return list_aggregators()


@click.command("distill")
@click.option("--teacher", default=None, help="the trained teacher (.pt); omit for online schemes (cohort, osakd)")
@click.option("--teacher-arch", default=None, help="architecture of a teacher file that does not record it")
@click.option("--student", default=None, help="student architecture (see `kdcompress zoo`); a --preset names its own")
@click.option("--method", default=None,
              help="knowledge terms with optional weights: hinton, hinton+crd, hinton:0.9,crd:0.8,ce:1.0 (default: the "
                   "scheme's, hinton)")
@data_option(what="default: the teacher's dataset")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the student file; the run's stages, logs and training states go to OUTPUT.run/")
@click.option("--scheme", default=None,
              help=f"how the student learns: {', '.join(DISTILL_SCHEMES)} (default: offline with a teacher)")
@click.option("--chain", default=None, help="teacher assistants, largest first: --chain resnet56,resnet32 (TAKD)")
@click.option("--dgkd", is_flag=True, help="with --chain: every stage learns from the teacher and all assistants above (DGKD)")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=None, help="DGKD: chance that each teacher is dropped per batch")
@click.option("--cohort", type=int, default=None, help="online cohort of N peers (no teacher)")
@click.option("--aggregator", default=None, cls=LazyHelpOption,
              help_text=lambda: f"cohort/ModReduce aggregator: {', '.join(_aggregators())}")
@click.option("--peers", default=None, help="heterogeneous cohort: comma-separated peer architectures")
@click.option("--k", "k", type=int, default=None, help="OSAKD: neighbours in the k-NN soft labels")
@click.option("--alpha", type=float, default=None, help="OSAKD: weight of cross-entropy (paper: 0.9, 0.99 for many classes)")
@click.option("--memory", type=click.IntRange(min=1), default=None,
              help="OSAKD: recent training outputs the neighbours come from (default 4096, at most the training set)")
@click.option("--students", type=int, default=None, help="TCN: number of students sharing the teacher's embedding")
@click.option("--hierarchical", is_flag=True, help="TCN: students learn from the level above (1 -> 2 -> 4 ...)")
@click.option("--preset", default=None, help="a bundled preset name (recipes/presets) or a plan YAML file")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="default: the dataset's protocol")
@click.option("--lr", type=float, callback=positive_finite, default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present, else CPU), cpu, cuda:N")
@click.option("--resume", is_flag=True, help="continue OUTPUT.run at the stage and epoch where it stopped")
@click.option("-q", "--quiet", is_flag=True, help="no per-epoch lines")
@threads_option
@trust_option
@corruption_options
def command(teacher, teacher_arch, student, method, data, output, scheme, chain, dgkd, drop_rate, cohort, aggregator,
            peers, k, alpha, memory, students, hierarchical, preset, epochs, lr, batch_size, seed, device, resume, quiet,
            threads, trust, label_noise, imbalance, imbalance_gamma) -> None:
    """Distil TEACHER into STUDENT on DATA and save the student; prints teacher and student test accuracy."""
    from compressor.threads import request
    from recipes.distill_run import distill

    corruption = corruption_from_flags(label_noise, imbalance, imbalance_gamma)
    # the scheme options the flags give (None: not given); the scheme's options class refuses the rest
    options = {"drop_rate": drop_rate, "cohort": cohort, "aggregator": aggregator, "peers": csv(peers), "k": k,
               "alpha": alpha, "memory": memory, "students": students, "hierarchical": hierarchical or None}
    if cohort is not None and cohort < 2:
        raise UserError(f"a cohort needs at least 2 peers (got --cohort {cohort})")
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    with request(threads):
        summary = distill(
            teacher=teacher, teacher_arch=teacher_arch, student=student, method=method, data=data, output=output,
            scheme=scheme, chain=csv(chain), dgkd=dgkd, options=options, preset=preset,
            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device, resume=resume,
            trust=trust, corruption=corruption, echo=echo, warn=lambda line: click.echo(line, err=True),
        )
    for line in summary:
        click.echo(line)
