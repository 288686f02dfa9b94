"""PerLTQA (English v2): each persona's memories as documents, and its QA pairs as questions about them.

A memory is a profile field (id = the field name, e.g. ``Gender``), a social relationship (``4_0``), an event
(``4_0_0``) or a dialogue (``4_0_0#3``). A QA pair's ``"Reference Memory"`` is a profile field name or a Python-literal
list of memory ids such as ``"['4_0_0']"``. An example is one QA pair with a seeded random subset of its persona's
memories that always includes the referenced ones, shuffled so their position gives nothing away. With
``n_docs=1`` an example holds exactly its referenced memories (retrieval's ground truth: ``commer memories``).
"""

from __future__ import annotations

import ast
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from commer.data.errors import DataError, read_json, resolve_data_dir
from commer.data.splits import Loaded
from commer.errors import ConfigError
from commer.text import Example

MEMORY_FILE = Path("perltqa") / "perltmem_subset.json"
QA_FILE = Path("perltqa") / "perltqa_subset.json"
DEFAULT_N_DOCS = 4
MEMORY_KINDS = ("social_relationship", "events", "dialogues")


def _dialogue_text(contents: dict[str, list[str]]) -> str:
    return "\n".join(f"Dialogue ({when}):\n" + "\n".join(lines) for when, lines in contents.items())


def persona_memories(persona: str, record: dict[str, Any]) -> dict[str, str]:
    """Memory id -> document text for one persona's record of the memory file.

    The free-text ``profile_description`` is left out: it restates the profile fields, which are memories already,
    and no QA pair references it.
    """
    try:
        memories = {name: f"Profile - {name}: {value}" for name, value in record["profile"].items()}
        for mid, rel in record["social_relationship"].items():
            memories[mid] = (
                f"Relationship - {rel['Supporting Characters']} ({rel['Relationship']}): {rel['Description']}"
            )
        for mid, event in record["events"].items():
            memories[mid] = f"Event ({event['Creation Time']}): {event['content']}"
        for mid, dialogue in record["dialogues"].items():
            memories[mid] = _dialogue_text(dialogue["contents"])
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{MEMORY_FILE}: persona {persona!r} has a memory missing field {e}") from e
    return memories


def referenced_ids(reference: Any) -> list[str] | None:
    """The memory ids a QA pair's ``"Reference Memory"`` names, or None if it is not a readable reference."""
    if not isinstance(reference, str):
        return None
    if not reference.startswith("["):
        return [reference]
    try:
        ids = ast.literal_eval(reference)
    except (ValueError, SyntaxError):
        return None
    return [str(i) for i in ids] if isinstance(ids, list) and ids else None


def iter_qa(qa_data: Any, source: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(persona, QA pair) for every QA pair of the QA file's structure, in file order."""
    if not isinstance(qa_data, list):
        raise DataError(f"{source}: expected a list of {{persona: QA groups}}")
    for k, entry in enumerate(qa_data):
        if not isinstance(entry, dict):
            raise DataError(f"{source}: entry [{k}] is not an object")
        for persona, groups in entry.items():
            for kind, items in groups.items():
                # Profile QA pairs are listed directly; the other kinds are grouped under their memory id.
                pairs = items if kind == "profile" else [qa for group in items for qas in group.values() for qa in qas]
                for qa in pairs:
                    if not isinstance(qa, dict) or not {"Question", "Answer"} <= qa.keys():
                        raise DataError(f"{source}: a {kind} QA pair of {persona!r} lacks Question/Answer: {qa}")
                    yield persona, qa


def load_perltqa(data_dir: str | Path | None = None, n_docs: int = DEFAULT_N_DOCS, seed: int = 0) -> Loaded:
    """PerLTQA examples with ``n_docs`` memories each (all the persona's memories if it has fewer).

    QA pairs whose reference does not resolve to a memory of their persona are skipped (``unresolved_reference``).
    The subset of each example depends only on ``seed``, the persona and the QA pair's position.
    """
    if n_docs < 1:
        raise ConfigError(f"n_docs must be at least 1 (the referenced memory), got {n_docs}")
    root = resolve_data_dir(data_dir)
    memory_data = read_json(root / MEMORY_FILE, "PerLTQA memory file")
    qa_data = read_json(root / QA_FILE, "PerLTQA QA file")
    if not isinstance(memory_data, dict):
        raise DataError(f"{root / MEMORY_FILE}: expected an object keyed by persona")
    memories = {persona: persona_memories(persona, record) for persona, record in memory_data.items()}

    loaded = Loaded(
        examples=[],
        profile_sizes={p: len(m) for p, m in memories.items()},
        skipped={"unresolved_reference": 0},
    )
    for k, (persona, qa) in enumerate(iter_qa(qa_data, root / QA_FILE)):
        own = memories.get(persona, {})
        refs = referenced_ids(qa.get("Reference Memory"))
        if not refs or any(r not in own for r in refs):
            loaded.skipped["unresolved_reference"] += 1
            continue
        rng = random.Random(f"{seed}:{persona}:{k}")
        others = sorted(set(own) - set(refs))
        chosen = refs + rng.sample(others, min(len(others), max(0, n_docs - len(refs))))
        rng.shuffle(chosen)
        loaded.examples.append(Example(persona, [own[m] for m in chosen], qa["Question"], qa["Answer"]))
    return loaded
