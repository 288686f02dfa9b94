"""The ``commer`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(help="ComMer: personalize a frozen LLM with each user's documents.", no_args_is_help=True)

DEMO_USERS = {
    "alice": [
        "Ran my first half marathon this morning, legs are jelly but so happy!",
        "Trail running in the hills again, nothing beats the sunrise up there.",
        "New running shoes arrived, testing them on a 10k tomorrow.",
    ],
    "bob": [
        "Spent the whole weekend baking sourdough, the crust finally came out right.",
        "Tried a new ramen recipe tonight, the broth took six hours and was worth it.",
        "Farmers market haul: tomatoes, basil and fresh mozzarella for pizza night.",
    ],
}
DEMO_INSTRUCTION = "Write a short tweet about my plans for Saturday."


@app.command()
def demo(
    backbone: str = typer.Option("smollm2-135m", help="Backbone: 'smollm2-135m', a model folder or a hub id."),
    checkpoint: Path | None = typer.Option(None, help="A trained checkpoint (default: an untrained ComMer)."),
    num_embeddings: int = typer.Option(16, "--k", help="K, compression embeddings per document (untrained model)."),
    max_new_tokens: int = typer.Option(48, help="Tokens to generate per answer."),
) -> None:
    """Compress a few documents for two users and generate a personalized answer for each."""
    from commer.backbone import load_backbone
    from commer.config import ComMerConfig
    from commer.pipeline import Personalizer

    start = time.perf_counter()
    bb = load_backbone(backbone)
    typer.echo(f"backbone {bb.name} (fingerprint {bb.fingerprint}) loaded in {time.perf_counter() - start:.1f}s")
    if checkpoint is None:
        typer.echo("no --checkpoint given: the compressor is untrained, so answers show the mechanics, not quality")
        personalizer = Personalizer.new(bb, ComMerConfig(num_embeddings=num_embeddings))
    else:
        personalizer = Personalizer.from_checkpoint(checkpoint, bb)
    k, d = personalizer.shape
    profiles = {}
    for user, docs in DEMO_USERS.items():
        t = time.perf_counter()
        profiles[user] = personalizer.profile(docs)
        typer.echo(f"{user}: {len(docs)} documents -> one {k}x{d} soft prompt in {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    answers = personalizer.generate(
        [*profiles.values(), None], [DEMO_INSTRUCTION] * (len(profiles) + 1), max_new_tokens=max_new_tokens
    )
    typer.echo(f"generated {len(answers)} answers in one batch in {time.perf_counter() - t:.2f}s")
    typer.echo(f"\ninstruction: {DEMO_INSTRUCTION}")
    for user, answer in zip([*profiles, "(no documents)"], answers, strict=True):
        typer.echo(f"[{user}] {answer}")


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints, logs and results go."),
    data_dir: str | None = typer.Option(None, help="The shared data folder (default ../shared/data)."),
    backbone: str = typer.Option("smollm2-135m"),
    k: int = typer.Option(8, help="Compression embeddings per document."),
    n_docs: int = typer.Option(2, help="Documents per user (top-n by BM25)."),
    pretrain_steps: int = typer.Option(30),
    finetune_steps: int = typer.Option(120),
    batch_size: int = typer.Option(8),
    test_users: int = typer.Option(96),
) -> None:
    """Pretrain, fine-tune on LaMP-7 and show on held-out users whether their documents help (~15 min on 2 CPUs)."""
    from commer.quickstart import quickstart as run_quickstart

    run_quickstart(
        output_dir,
        data_dir,
        backbone,
        num_embeddings=k,
        n_docs=n_docs,
        pretrain_steps=pretrain_steps,
        finetune_steps=finetune_steps,
        batch_size=batch_size,
        test_users=test_users,
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="A run config, e.g. configs/lamp7.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set model.num_embeddings=16."),
) -> None:
    """Train ComMer or the prompt-tuning baseline as a run config says (resumes from OUTPUT_DIR/last)."""
    from commer.train import load_config, run

    summary = run(load_config(config, overrides))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def info(checkpoint: Path) -> None:
    """Print a checkpoint's config and the backbone it was trained on."""
    from commer.checkpoint import read_meta

    typer.echo(json.dumps(read_meta(checkpoint), indent=2))


# sub-commands of other modules, registered after the app exists
from commer.data.cli import data_app  # noqa: E402
from commer.service.cli import register  # noqa: E402

app.add_typer(data_app, name="data", help="Datasets: statistics of what you train on.")
register(app)



def main() -> None:
    """The ``commer`` entry point: bad input ends with one line naming the problem, not a traceback
    (``COMMER_DEBUG=1`` shows the traceback)."""
    import os

    from commer.store import StoreError

    try:
        app()
    except (ValueError, StoreError, FileNotFoundError) as err:
        if os.environ.get("COMMER_DEBUG") == "1":
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        typer.secho(f"error: {message}", err=True, fg="red")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
