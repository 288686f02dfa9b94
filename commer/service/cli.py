"""Command line of the store and the service: ``serve``, ``generate``, and ``profile add|show|remove|rebuild``.

``commer.cli`` mounts them with ``register(app)``; ``python -m commer.service`` runs them on their own.
Everything but ``serve`` works on the database directly, without a server.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from commer.config import DEFAULT_BACKBONE, DEFAULT_K, ComMerConfig, help_of
from commer.errors import CommerError
from commer.service.limits import ServiceLimits

if TYPE_CHECKING:
    from commer.serving import Personalizer
    from commer.store import ProfileStore

DEFAULT_DB = Path("commer.db")

profile_app = typer.Typer(
    help="Manage stored user profiles (directly on the database, no server).", no_args_is_help=True
)

# The served model's options, shared by every command that loads one (here and in commer.cli).
CHECKPOINT = typer.Option(
    None, help="Trained checkpoint folder or 'pretrained' (default: an untrained ComMer, with a warning)."
)
BACKBONE = typer.Option(DEFAULT_BACKBONE, help="Backbone: 'smollm2-135m', a local model folder or a hub id.")
K = typer.Option(DEFAULT_K, "--k", help=help_of(ComMerConfig, "num_embeddings") + " Untrained model only.")
BF16_COMPRESS = typer.Option(
    False, help="Compress documents under bfloat16 autocast where the CPU or GPU has it (2-3x faster on AMX)."
)
_DB = typer.Option(DEFAULT_DB, help="SQLite database of the profiles.")
_TENANT = typer.Option("default", help="Tenant the user belongs to.")
_LIMITS = ServiceLimits()


def _limit(name: str):  # noqa: ANN202 - a typer option
    """``commer serve``'s option for a ``ServiceLimits`` field: its default and help from the field."""
    default = getattr(_LIMITS, name)
    if isinstance(default, bool):
        return typer.Option(default, help=help_of(ServiceLimits, name))
    return typer.Option(default, min=0.0 if name == "batch_wait_ms" else 1, help=help_of(ServiceLimits, name))


def served_model(
    checkpoint: Path | str | None, backbone: str, num_embeddings: int, bf16_compress: bool = False
) -> Personalizer:
    """``commer.serving.load_personalizer`` from the shared options, warning when the model is untrained."""
    from commer.serving import load_personalizer

    if checkpoint is None:
        typer.secho(
            "warning: no --checkpoint: serving an UNTRAINED compressor; answers show the mechanics, not quality",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return _or_exit(load_personalizer, checkpoint, backbone, num_embeddings, bf16_compress)


def open_store(db: Path, personalizer: Personalizer) -> ProfileStore:
    """The database, serving ``personalizer``'s model."""
    from commer.checkpoint import model_fingerprint
    from commer.store import ProfileStore

    return _or_exit(ProfileStore, db, model_fingerprint(personalizer.model), personalizer.shape)


def read_api_keys(path: Path | None) -> dict[str, str]:
    """API key -> tenant, from ``path`` (a JSON object) or else the ``COMMER_API_KEYS`` environment variable."""
    if path is not None:
        source, text = str(path), path.read_text()
    elif "COMMER_API_KEYS" in os.environ:
        source, text = "$COMMER_API_KEYS", os.environ["COMMER_API_KEYS"]
    else:
        raise typer.BadParameter("no API keys: pass --api-keys FILE or set COMMER_API_KEYS to a JSON object")
    try:
        keys = json.loads(text)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"{source} is not valid JSON: {err}") from err
    if not isinstance(keys, dict) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise typer.BadParameter(f'{source} must be a non-empty JSON object {{"API key": "tenant", ...}}')
    if not all(isinstance(t, str) and t for t in keys.values()):
        raise typer.BadParameter(f"{source}: every tenant must be a non-empty string")
    return keys


def serve(
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    api_keys: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help='JSON file {"API key": "tenant"} (default: $COMMER_API_KEYS).'
    ),
    max_batch_size: int = _limit("max_batch_size"),
    batch_wait_ms: float = _limit("batch_wait_ms"),
    max_new_tokens: int = _limit("max_new_tokens"),
    max_document_chars: int = _limit("max_document_chars"),
    max_documents_per_request: int = _limit("max_documents_per_request"),
    max_instruction_chars: int = _limit("max_instruction_chars"),
    max_body_bytes: int = _limit("max_body_bytes"),
    max_queued: int = _limit("max_queued"),
    max_queued_per_tenant: int = _limit("max_queued_per_tenant"),
    max_top_k: int = _limit("max_top_k"),
    bm25_merge: bool = _limit("bm25_merge"),
    bf16_compress: bool = BF16_COMPRESS,
    compile_decoding: bool = typer.Option(
        False,
        help="Decode into a static KV cache with a torch.compile'd step (local generator): 1.2x one user's speed, "
        "0.94x at 16 users in float32, after compiles of up to a minute per new batch shape (docs/benchmarks.md).",
    ),
    bf16_decode: bool = typer.Option(
        False,
        help="Decode with a bfloat16 copy of the generator's weights (+ half their size in memory): 1.18x for 16 users "
        "with long answers on AMX CPUs, slower for one user or short answers; greedy answers may change by bf16 "
        "rounding (docs/benchmarks.md).",
    ),
    openai_unknown_user: str = typer.Option(
        "plain", help="/v1/chat/completions for a `user` without a profile: 'plain' (unpersonalized) or '404'."
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    generator: str = typer.Option("local", help="Who decodes: 'local' (this process) or 'vllm' (a vLLM server)."),
    vllm_url: str | None = typer.Option(None, help="The vLLM server (started with --enable-prompt-embeds)."),
    vllm_model: str | None = typer.Option(None, help="The model name vLLM serves (default: its only one)."),
) -> None:
    """Serve the HTTP API (profiles, batched personalized generation, /metrics)."""
    import uvicorn

    from commer.service.app import create_app

    if generator not in ("local", "vllm"):
        raise typer.BadParameter(f"--generator must be 'local' or 'vllm', got {generator!r}")
    if generator == "vllm" and not vllm_url:
        raise typer.BadParameter("--generator vllm needs --vllm-url, e.g. http://127.0.0.1:8001")
    if generator == "vllm" and (compile_decoding or bf16_decode):
        raise typer.BadParameter("--compile-decoding and --bf16-decode change local decoding; with vllm, vLLM decodes")
    keys = read_api_keys(api_keys)
    personalizer = served_model(checkpoint, backbone, num_embeddings, bf16_compress)
    if bf16_decode:
        import torch

        personalizer.model.decode_in(torch.bfloat16)
    if compile_decoding:
        personalizer.model.static_decoding()
    store = open_store(db, personalizer)
    limits = ServiceLimits(
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        max_new_tokens=max_new_tokens,
        max_document_chars=max_document_chars,
        max_documents_per_request=max_documents_per_request,
        max_instruction_chars=max_instruction_chars,
        max_body_bytes=max_body_bytes,
        max_queued=max_queued,
        max_queued_per_tenant=max_queued_per_tenant,
        max_top_k=max_top_k,
        bm25_merge=bm25_merge,
    )
    remote = None
    if generator == "vllm":
        from commer.scale.vllm import VLLMGenerator

        remote = VLLMGenerator(vllm_url, vllm_model)
    app = _or_exit(create_app, personalizer, store, keys, limits, remote, openai_unknown_user)
    typer.echo(f"serving model {store.fingerprint} from {db} for {len(set(keys.values()))} tenant(s)", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        store.close()


def generate(
    user: str = typer.Argument(..., help="The user whose profile personalizes the answer."),
    instruction: str = typer.Argument(..., help="What to answer."),
    tenant: str = _TENANT,
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
    max_new_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int | None = typer.Option(None),
) -> None:
    """Answer an instruction from a stored profile, without a server."""
    personalizer = served_model(checkpoint, backbone, num_embeddings)
    with open_store(db, personalizer) as store:
        profile = _or_exit(store.get_profile, tenant, user)
    [answer] = personalizer.generate([profile], [instruction], max_new_tokens, temperature, top_p, seed)
    typer.echo(answer)


@profile_app.command("add")
def profile_add(
    user: str = typer.Argument(...),
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Text files, one document each."),
    lines: bool = typer.Option(False, help="Each non-blank line of a file is a document."),
    tenant: str = _TENANT,
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
) -> None:
    """Compress documents and add them to a user's profile (already stored documents are skipped)."""
    from commer.serving import add_texts

    texts = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        texts.extend([x for x in text.splitlines() if x.strip()] if lines else [text])
    personalizer = served_model(checkpoint, backbone, num_embeddings)
    with open_store(db, personalizer) as store:
        done = _or_exit(add_texts, store, personalizer, tenant, user, texts)
    for doc_id in done.ids:
        typer.echo(doc_id)
    typer.echo(f"user {user!r}: {done.count} documents", err=True)


@profile_app.command("show")
def profile_show(
    user: str = typer.Argument(...),
    tenant: str = _TENANT,
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
) -> None:
    """Print a user's profile: count, model fingerprint and documents (JSON)."""
    personalizer = served_model(checkpoint, backbone, num_embeddings)
    with open_store(db, personalizer) as store:
        info = _or_exit(store.user_info, tenant, user)
        docs = store.list_documents(tenant, user)
    out = {
        "tenant": tenant,
        "user": user,
        "count": info.count,
        "fingerprint": info.fingerprint,
        "stale": info.stale,
        "documents": [{"id": x.id, "chars": x.chars, "added_at": x.added_at} for x in docs],
    }
    typer.echo(json.dumps(out, indent=2))


@profile_app.command("remove")
def profile_remove(
    user: str = typer.Argument(...),
    doc: str = typer.Argument(..., help="Document id (as `profile show` lists it)."),
    tenant: str = _TENANT,
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
) -> None:
    """Remove one document from a user's profile."""
    personalizer = served_model(checkpoint, backbone, num_embeddings)
    with open_store(db, personalizer) as store:
        count = _or_exit(store.remove_document, tenant, user, doc)
    typer.echo(f"removed {doc}; user {user!r} has {count} documents")


@profile_app.command("rebuild")
def profile_rebuild(
    checkpoint: Path | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    db: Path = _DB,
) -> None:
    """Re-compress the stored documents of every profile computed by another model than this one."""
    personalizer = served_model(checkpoint, backbone, num_embeddings)
    with open_store(db, personalizer) as store:
        report = store.rebuild(personalizer)
    typer.echo(f"rebuilt {report.users} profiles ({report.documents} documents) for model {store.fingerprint}")
    for tenant, user, doc_id, reason in report.failed:
        typer.secho(f"not rebuilt: tenant {tenant!r} user {user!r} document {doc_id}: {reason}", err=True, fg="red")
    if report.failed:
        raise typer.Exit(1)


def _or_exit(fn, *args):  # noqa: ANN001, ANN202 - a thin wrapper
    """Run a model or store operation; an error the user can fix (a bad checkpoint, backbone or database path, a
    store error) becomes a one-line message and exit status 1, not a traceback."""
    try:
        return fn(*args)
    except (CommerError, OSError, sqlite3.Error) as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(1) from err


def register(app: typer.Typer) -> None:
    """Mount ``serve``, ``generate`` and ``profile ...`` on the main ``commer`` command line."""
    app.command()(serve)
    app.command()(generate)
    app.add_typer(profile_app, name="profile")


def main() -> None:
    """``python -m commer.service``: these commands without the rest of ``commer``."""
    app = typer.Typer(help="commer store and service", no_args_is_help=True)
    register(app)
    app()
