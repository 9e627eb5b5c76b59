"""scripts/context_sensitivity_probe.py: sharing stream prefixes changes no score, and its
knapsack and swap steps keep the BF16 cap."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from builder.quantize.formats import LinearFormat, Recipe, model_units
from builder.synth import SynthSpec, write_synthetic

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "context_sensitivity_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("context_sensitivity_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic(
        tmp_path_factory.mktemp("context") / "mixed", SynthSpec(preset="mixed", hidden=64, heads=4)
    )


def test_shared_prefixes_score_exactly_as_separate_streams(probe, ckpt):
    """score_shared runs each distinct prefix once instead of each stream; the block copies,
    inputs, batches and head are the same as score_recipes', so the scores must be equal
    bit for bit (any difference is a stream fed the wrong prefix)."""
    from builder.arch import load_plan
    from builder.verify.sensitivity import score_recipes

    plan = load_plan(ckpt)
    units = model_units(plan)
    base = Recipe.uniform(LinearFormat.FP8_PC_PT)
    recipes = {"base": base, "bf16": Recipe.uniform(LinearFormat.BF16)}
    for u in (units[0], units[len(units) // 2], units[-1]):
        recipes[f"loo {u.key}"] = probe.with_formats(base, {u.key: LinearFormat.BF16})
    windows = torch.randint(0, plan.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    shared = probe.score_shared(ckpt, recipes, windows, None, None)
    separate = score_recipes(ckpt, recipes, windows)
    for name in recipes:
        a, b = shared[name], separate[name]
        assert (a.kl, a.kl_p99, a.top1) == (b.kl, b.kl_p99, b.top1), name
    assert shared["bf16"].kl == 0.0
    assert shared["base"].kl > 0.0


def test_knapsack_best_gain_per_parameter_within_the_cap(probe):
    gains = {"a": 4.0, "b": 3.0, "c": 1.0, "d": -1.0}
    sizes = {"a": 4, "b": 1, "c": 1, "d": 1}
    # per parameter: b 3, c 1, a 1 (tie broken by order), d never (no gain)
    assert probe.knapsack(gains, sizes, 2) == ["b", "c"]
    assert sorted(probe.knapsack(gains, sizes, 6)) == ["a", "b", "c"]


def test_refine_swaps_only_pairs_that_gain_and_fit(probe):
    sizes = {"in1": 2, "in2": 2, "q1": 2, "q2": 2, "q3": 1}
    loss_in = {"in1": 0.5, "in2": 3.0}  # BF16 units: cost of quantizing them again
    gain_out = {"q1": 2.0, "q2": 0.1, "q3": 1.0}  # quantized units: gain of BF16
    swaps = probe.refine_swaps(loss_in, gain_out, sizes, free=1)
    # q1 (1.0 per parameter) replaces in1 (0.25 per parameter); q3 fits the free parameter;
    # q2's gain is below every remaining loss
    assert swaps == [("in1", "q1"), (None, "q3")]
