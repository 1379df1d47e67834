"""The quick study in seconds: the noise estimator it picks where per-example gradients would fall back to vmap's
slow path, and says why, without a warning."""

import json
from conftest import CONFIGS

from test_examples import QUICK_TINY


def test_a_transformer_gets_the_two_batch_estimate_and_says_why_without_a_warning(batchlab, tmp_path):
    result = batchlab("study", "-c", str(CONFIGS / "chars.yaml"), *QUICK_TINY, "--data.n_sequences", "600")
    assert result.code == 0, result.err
    gns = json.loads((tmp_path / "quick" / "gns.json").read_text())
    assert gns["method"] == "two_batch"
    assert "no batching rule for aten::_scaled_dot_product" in gns["method_reason"]
    quick = json.loads((tmp_path / "quick" / "quick.json").read_text())
    assert quick["b_simple_method_reason"] == gns["method_reason"]
    assert "Per-example gradients were not used: torch.func has no batching rule" in result.out
    assert "Warning" not in result.err + result.out and "performance drop" not in result.err


def test_a_model_vmap_handles_keeps_per_example_gradients_and_no_reason(batchlab, tmp_path):
    result = batchlab("study", "-c", str(CONFIGS / "digits.yaml"), *QUICK_TINY)
    assert result.code == 0, result.err
    gns = json.loads((tmp_path / "quick" / "gns.json").read_text())
    assert gns["method"] == "per_example" and "method_reason" not in gns
    assert "Per-example gradients were not used" not in result.out
