"""The cost of answering: ComMer (K=16) against prompt tuning with the same documents in its prompt, side by side;
then what retrieval-merge adds per request against the O(1) mean, at 10, 100 and 1,000 stored documents.

    python bench/answer_cost.py [--task lamp7] [--backbone smollm2-135m] [--k 16] [--users 8] [--new-tokens 32]
                                [--rounds 3]

Real users with at least 8 documents, at 1, 4 and 8 documents each: LaMP-7 users (their top-8 profile tweets by BM25,
about 30 tokens each) or, with ``--task perltqa``, one question of each PerLTQA persona with 8 of its memories (events
and dialogues: hundreds of tokens each, Figure 5's setting). For each number
of documents it times one batch of ``--users`` requests: ComMer generating from the users' merged soft prompts
(compressed beforehand, as the profile store keeps them), ComMer compressing the documents first (what a cold start
costs), and prompt tuning reading the documents as text. Every request decodes exactly ``--new-tokens`` tokens (EOS is
ignored), so only the prompt differs; the time to the first token (prefill and one step) is timed too, for ComMer and
prompt tuning. Rounds alternate between the jobs to spread machine noise evenly; medians.
The models are untrained: latency and token counts do not depend on the weights' values.

Retrieval-merge: one user's profile in a SQLite store (a temporary file) with N stored compressions (random vectors of
the model's shape: the cost does not depend on their values). Per request, timed side by side, medians: selecting the
soft prompt by the mean (read the running sum: what ``generate`` does by default), by dense retrieval-merge (read the N
compressions, compress the request, rank by cosine, mean the top-k) and by BM25 retrieval-merge (read the N
compressions and texts, rank the texts); then decoding one answer from K vectors, the same after any of them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from commer.backbone import load_backbone
from commer.checkpoint import model_fingerprint
from commer.config import ComMerConfig
from commer.data.tasks import LOADERS
from commer.evaluate import autocast, prompt_cost
from commer.model import ComMer, PromptTuning
from commer.serving import Personalizer
from commer.store import ProfileStore
from commer.text import Collator, Example

DOCS = (1, 4, 8)
STORED = (10, 100, 1000)  # stored documents per user, for retrieval-merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lamp7", choices=["lamp7", "perltqa"], help="Whose documents.")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=4, help="Retrieval-merge's k.")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    first: dict[str, Example] = {}  # the first example of each user with enough documents
    for e in LOADERS[args.task](args.data_dir, max(DOCS), 0).examples:
        if len(e.documents) >= max(DOCS):
            first.setdefault(e.user_id, e)
    users = list(first.values())[: args.users]
    # Two backbones: ComMer injects its LoRA into the weights it is given, and prompt tuning must run the plain model.
    commer = ComMer(load_backbone(args.backbone), ComMerConfig(num_embeddings=args.k)).eval()
    backbone = load_backbone(args.backbone)
    tuning = PromptTuning(backbone, ComMerConfig(method="prompt_tuning", num_embeddings=args.k)).eval()
    collators = {m: Collator(backbone.tokenizer, m.config, m.max_length) for m in (commer, tuning)}
    decoding = {"eos_token_id": -1, "pad_token_id": collators[commer].pad_id, "max_new_tokens": args.new_tokens}
    first_token = {**decoding, "max_new_tokens": 1}  # the time to the first token: prefill and one step

    jobs: dict[tuple[str, int], Callable[[], torch.Tensor]] = {}
    tokens: dict[tuple[str, int], float] = {}
    for n in DOCS:
        examples = [Example(u.user_id, u.documents[:n], u.instruction) for u in users]
        batch = collators[commer](examples, with_answers=False)
        pt_batch = collators[tuning](examples, with_answers=False)
        with autocast(commer.device, True):
            prefix, mask = commer.prefix(batch)  # compressed beforehand: what a stored profile holds
        jobs["commer", n] = lambda b=batch, p=prefix, m=mask: commer.decode(p, m, b.input_ids, b.input_mask, **decoding)
        jobs["commer+compress", n] = lambda b=batch: commer.generate(b, **decoding)
        jobs["prompt tuning", n] = lambda b=pt_batch: tuning.generate(b, **decoding)
        jobs["commer first", n] = lambda b=batch, p=prefix, m=mask: commer.decode(
            p, m, b.input_ids, b.input_mask, **first_token
        )
        jobs["prompt tuning first", n] = lambda b=pt_batch: tuning.generate(b, **first_token)
        tokens["commer", n] = prompt_cost(collators[commer], examples).generator
        tokens["prompt tuning", n] = prompt_cost(collators[tuning], examples).generator

    def timed(key: tuple[str, int]) -> float:
        start = time.perf_counter()
        with autocast(commer.device, True):
            out = jobs[key]()
        expected = 1 if key[0].endswith("first") else args.new_tokens
        if out.shape[1] != expected:
            raise RuntimeError(f"decoded {out.shape[1]} tokens, expected {expected}: the timings would differ")
        return time.perf_counter() - start

    for key in jobs:  # warm-up
        timed(key)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
    for _ in range(args.rounds):
        for key in jobs:
            times[key].append(timed(key))
    median = {key: statistics.median(t) for key, t in times.items()}

    print(
        f"backbone {args.backbone}, K={args.k}, {len(users)} {args.task} users per batch, {args.new_tokens} new "
        f"tokens each, torch threads {torch.get_num_threads()}, median of {args.rounds} alternating rounds"
    )
    print("generator prompt tokens per request (soft prompt + text prompt) and seconds per batch:")
    print(" docs | ComMer tok | PT tok | ComMer s | ComMer+compress s |  PT s | ComMer/PT s | first token: ComMer/PT s")
    print("------+------------+--------+----------+-------------------+-------+-------------+-------------------------")
    for n in DOCS:
        c, cc, p = median["commer", n], median["commer+compress", n], median["prompt tuning", n]
        c1, p1 = median["commer first", n], median["prompt tuning first", n]
        ct, pt = tokens["commer", n], tokens["prompt tuning", n]
        row = f"{n:5} | {ct:10.1f} | {pt:6.1f} | {c:8.3f} | {cc:17.3f} | {p:5.3f} | {c / p:11.2f}"
        print(f"{row} | {c1:.3f}/{p1:.3f} = {c1 / p1:.2f}")
    first, last = DOCS[0], DOCS[-1]
    print(
        f"ComMer at {last} vs {first} documents: tokens x{tokens['commer', last] / tokens['commer', first]:.2f}, "
        f"latency x{median['commer', last] / median['commer', first]:.2f} (flat: the merged prompt is K vectors); "
        f"prompt tuning: tokens x{tokens['prompt tuning', last] / tokens['prompt tuning', first]:.2f}, "
        f"latency x{median['prompt tuning', last] / median['prompt tuning', first]:.2f}"
    )
    retrieval_cost(Personalizer(commer, backbone.tokenizer), users[0], args.top_k, args.new_tokens, args.rounds)


def retrieval_cost(personalizer: Personalizer, user: Example, top_k: int, new_tokens: int, rounds: int) -> None:
    """Print one request's time to select its soft prompt (mean, dense and BM25 retrieval-merge) and to decode."""
    k, d = personalizer.shape
    ms = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ProfileStore(Path(tmp) / "bench.db", model_fingerprint(personalizer.model), (k, d))
        for n in STORED:
            name = f"user-{n}"
            texts = [user.documents[i % len(user.documents)] + f" ({i})" for i in range(n)]
            store.add_documents("bench", name, texts, torch.randn(n, k, d, generator=torch.Generator().manual_seed(n)))
            selections = {
                "mean": lambda u=name: store.get_profile("bench", u),
                "dense": lambda u=name: personalizer.retrieval_profile(
                    user.instruction, store.document_compressions("bench", u)[0], top_k
                ),
                "bm25": lambda u=name: _bm25(personalizer, store, u, user.instruction, top_k),
            }
            times: dict[str, list[float]] = {way: [] for way in selections}
            for _ in range(rounds + 1):  # the first round warms up
                for way, select in selections.items():
                    start = time.perf_counter()
                    select()
                    times[way].append(time.perf_counter() - start)
            for way, t in times.items():
                ms[way, n] = 1000 * statistics.median(t[1:])
        profile = store.get_profile("bench", f"user-{STORED[0]}")
        store.close()
    prefix, mask = personalizer.soft_prompts([profile])
    ids, ids_mask = personalizer.collator.pad([personalizer.collator.encode_prompt(user.instruction)])
    pad = personalizer.collator.pad_id
    decode = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        with autocast(personalizer.model.device, True):  # as the table above
            personalizer.model.decode(
                prefix, mask, ids, ids_mask, eos_token_id=-1, pad_token_id=pad, max_new_tokens=new_tokens
            )
        decode.append(time.perf_counter() - start)
    decode_ms = 1000 * statistics.median(decode[1:])
    print(f"\nretrieval-merge (top_k={top_k}) per request, one user, ms (median of {rounds}); decoding "
          f"{new_tokens} tokens from K={k} vectors after any of them: {decode_ms:.0f} ms")  # fmt: skip
    print(" stored docs | mean | dense | bm25 | request with mean | with dense | with bm25")
    print("-------------+------+-------+------+-------------------+------------+----------")
    for n in STORED:
        mean, dense, bm25 = ms["mean", n], ms["dense", n], ms["bm25", n]
        total = [decode_ms + x for x in (mean, dense, bm25)]
        row = f"{n:12} | {mean:4.1f} | {dense:5.0f} | {bm25:4.0f}"
        print(f"{row} | {total[0]:17.0f} | {total[1]:10.0f} | {total[2]:8.0f}")


def _bm25(personalizer: Personalizer, store: ProfileStore, user: str, request: str, top_k: int) -> None:
    compressions, texts = store.document_compressions("bench", user, with_texts=True)
    personalizer.retrieval_profile(request, compressions, top_k, texts)


if __name__ == "__main__":
    main()
