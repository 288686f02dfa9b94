"""How often each way of ranking a user's memories finds the one a question refers to (PerLTQA, no perplexity).

    python bench/retrieval_recall.py [--checkpoint runs/perltqa-commer/best] [--n 8] [--split train --split validation]

For every question of the given splits (never the test persona: this chooses settings), its ``n`` memories (the
referenced ones among random others) are ranked by each signal, and the reference recall of the top k (k = 1, 2, 4) is
printed: the share of the referenced memories that the top k holds (``commer.experiments.memories.reference_recall``).
Signals: ``bm25`` over the texts; dense ones on the compressions of the question and the memories by the checkpoint's
compressor: ``dense`` (what ``commer.merge.dense_scores`` computes), ``dense-centred`` (the same after subtracting the
mean of the user's compressions, session 6's choice), ``mean-K`` (cosine of the K vectors' means), ``neg-l2`` (minus
the L2 distance), ``bridge`` (cosine after the linear bridge's map); ``fused`` (reciprocal-rank fusion of dense-centred
and BM25) and ``random``. Session 7's numbers are in docs/results.md.
"""

import argparse
import zlib

import torch
import torch.nn.functional as F

from commer.backbone import load_backbone
from commer.checkpoint import load_checkpoint
from commer.data.tasks import load_splits
from commer.experiments.memories import reference_recall, referenced_memories
from commer.merge import dense_scores
from commer.serving import Personalizer, bm25_scores


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """1 for the best score, n for the worst (ties: the earlier one ranks higher)."""
    r = torch.empty(len(scores))
    r[torch.argsort(scores, descending=True, stable=True)] = torch.arange(1, len(scores) + 1).float()
    return r


def signals(model, question: torch.Tensor, memories: torch.Tensor, request: str, texts: list[str]) -> dict:
    """Every signal's ``(n,)`` scores for one question: ``question (K, D)``, ``memories (n, K, D)``."""
    flat, q = memories.flatten(1).double(), question.flatten().double()
    centre = flat.mean(0)
    with torch.no_grad():
        bridged = model.bridge.proj(memories.float()).flatten(1).double()
        q_bridged = model.bridge.proj(question[None].float()).flatten(1).double()
    out = {
        "dense": dense_scores(question, memories),
        "dense-centred": F.cosine_similarity(flat - centre, (q - centre)[None], dim=1),
        "mean-K": F.cosine_similarity(memories.mean(1).double(), question.mean(0).double()[None], dim=1),
        "neg-l2": -(flat - q).norm(dim=1),
        "bridge": F.cosine_similarity(bridged, q_bridged, dim=1),
        "bm25": bm25_scores(request, texts),
        "random": torch.rand(len(texts), generator=torch.Generator().manual_seed(zlib.crc32(request.encode()))),
    }
    out["fused"] = 1 / (60 + ranks(out["dense-centred"])) + 1 / (60 + ranks(out["bm25"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/perltqa-commer/best", help="A ComMer checkpoint (linear bridge).")
    parser.add_argument("--n", type=int, default=8, help="Memories per question.")
    parser.add_argument("--split", action="append", choices=["train", "validation"], help="Default: both.")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint)
    personalizer = Personalizer(model, load_backbone(model.backbone_name).tokenizer)
    examples = load_splits("perltqa", None, args.n, 0, max_chars=10**9)[0]
    for split in args.split or ["train", "validation"]:
        texts = sorted({t for e in examples[split] for t in (e.instruction, *e.documents)})
        compressions = dict(zip(texts, personalizer.compress(texts), strict=True))
        recall: dict[tuple[str, int], list[float]] = {}
        for e, referenced in zip(examples[split], referenced_memories(split), strict=True):
            memories = torch.stack([compressions[d] for d in e.documents])
            ranked = signals(model, compressions[e.instruction], memories, e.instruction, e.documents)
            for name, scores in ranked.items():
                for k in (1, 2, 4):
                    recall.setdefault((name, k), []).append(reference_recall(e, k, scores, referenced))
        print(f"{split}: {len(examples[split])} questions, {args.n} memories each; reference recall of the top k")
        for name in dict.fromkeys(name for name, _ in recall):
            cells = "  ".join(f"top-{k} {sum(recall[name, k]) / len(recall[name, k]):.3f}" for k in (1, 2, 4))
            print(f"  {name:14} {cells}", flush=True)


if __name__ == "__main__":
    main()
