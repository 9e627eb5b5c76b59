"""Block-streamed sensitivity and `--recipe auto` on the Ultra-shaped synthetic checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from builder.arch import load_plan, preset_plan
from builder.deploy.recipe_memory import bf16_fraction
from builder.quantize.formats import LinearFormat, Recipe, block_units, quantized_linear
from builder.verify import metrics
from builder.verify.auto import Option, hull, upgrade_path
from builder.verify.sensitivity import measure_sensitivity, score_recipes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PC, BF16 = LinearFormat.FP8_PC_PT, LinearFormat.BF16


def test_hull_drops_options_that_cost_more_for_no_gain():
    a, b, c = Option(PC, 0.01, 10), Option(LinearFormat.FP8, 0.02, 9), Option(BF16, 0.0, 20)
    worse = Option(LinearFormat.FP8, 0.03, 12)  # more bytes than b and more KL
    above = Option(PC, 0.009, 19)  # on no useful trade-off: above the b-c segment
    assert hull([a, b, c, worse, above]) == [b, a, c]


@pytest.fixture(scope="module")
def windows(ultra_ckpt):
    plan = load_plan(ultra_ckpt)
    return torch.randint(0, plan.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sens(ultra_ckpt, windows):
    return measure_sensitivity(ultra_ckpt, windows, None, (PC,), "block", torch.float32)


def test_sensitivity_covers_every_block_with_weights(sens, ultra_ckpt):
    plan = load_plan(ultra_ckpt)
    expected = {f"block {lay.index}" for lay in plan.layers if block_units(lay)}
    assert set(sens.kl) == expected and len(expected) < plan.num_layers  # empty ones skipped
    assert all(v["fp8-pc-pt"] > 0 for v in sens.kl.values())
    assert sens.base["fp8-pc-pt"].kl > max(v["fp8-pc-pt"] for v in sens.kl.values())


def test_streamed_score_equals_the_whole_model_with_one_block_quantized(ultra_ckpt, windows, sens):
    """The stream forks from the reference at its block and runs BF16 after it; the same
    recipe on the whole resident model (a different path: transformers' forward) agrees."""
    from builder.model import load_reference_model

    plan = load_plan(ultra_ckpt)
    layer = next(lay for lay in reversed(plan.layers) if block_units(lay))
    model = load_reference_model(ultra_ckpt, dtype=torch.float32)
    with torch.no_grad():
        ref = model(windows, use_cache=False).logits.float()
        block = model.model.layers[layer.index]
        prefix = f"model.layers.{layer.index}."
        for unit in block_units(layer):
            for module in unit.hf_modules:
                parent, leaf = module.removeprefix(prefix).rsplit(".", 1)
                linear = block.get_submodule(f"{parent}.{leaf}")
                setattr(block.get_submodule(parent), leaf, quantized_linear(linear, PC, None, None))
        out = model(windows, use_cache=False).logits.float()
    whole = float(torch.cat([metrics.full_kl(r, o) for r, o in zip(ref, out, strict=True)]).mean())
    streamed = sens.kl[f"block {layer.index}"]["fp8-pc-pt"]
    assert streamed == pytest.approx(whole, rel=1e-3)


def test_an_all_bf16_recipe_is_the_reference_exactly(ultra_ckpt, windows):
    scores = score_recipes(ultra_ckpt, {"bf16": Recipe.uniform(BF16)}, windows, None, torch.float32)
    assert scores["bf16"].kl == 0 and scores["bf16"].top1 == 1


def test_upgrade_path_rises_in_bytes_and_respects_the_bf16_cap(sens, ultra_ckpt):
    plan = load_plan(ultra_ckpt)
    steps, _, _ = upgrade_path(plan, sens, 4, 0.3)
    assert steps[0].bf16_fraction == 0 and len(steps) > 1
    assert all(
        a.bytes < b.bytes and a.kl_sum > b.kl_sum for a, b in zip(steps, steps[1:], strict=False)
    )
    assert all(s.bf16_fraction <= 0.3 for s in steps)
    assert bf16_fraction(plan, steps[-1].recipe) == pytest.approx(steps[-1].bf16_fraction)


def test_cli_auto_recipe_end_to_end(tmp_path, ultra_ckpt):
    from builder.cli.app import main

    runner = CliRunner()
    golden = tmp_path / "golden"
    ref = runner.invoke(
        main,
        [
            "reference",
            str(ultra_ckpt),
            str(golden),
            "--prompts",
            "wiki",
            "--windows",
            "2",
            "--seq-len",
            "24",
            "--continuation",
            "2",
        ],
    )
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "auto"
    args = [
        "quantize",
        str(ultra_ckpt),
        str(out),
        "--calib-size",
        "4",
        "--calib-seq-len",
        "24",
        "--recipe",
        "auto",
        "--max-kl",
        "0.05",
        "--max-bf16-fraction",
        "0.25",
        "--sensitivity-windows",
        "2",
        "--golden",
        str(golden),
        "--json",
    ]
    result = runner.invoke(main, args)
    manifest = json.loads((out / "manifest.json").read_text())
    auto = manifest["quantization"]["auto"]
    verdicts = [v["verdict"] for v in auto["verify"].values()]
    assert result.exit_code == (1 if "fail" in verdicts else 0), result.output
    assert set(auto["verify"]) == {"executor", "hf"}
    choice = auto["choice"]
    assert choice["bf16_fraction"] <= 0.25 and choice["table"]
    assert {r["format"] for r in choice["table"]} <= {"fp8", "fp8-pc-pt", "bf16"}
    assert manifest["quantization"]["recipe"] == choice["recipe"]
    from builder.check import check_artifact

    assert check_artifact(out).ok


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "auto"], "--recipe auto needs --max-kl"),
        (["--max-kl", "0.1"], "apply to --recipe auto only"),
        (["--recipe", "int4"], "not fp8, fp8-pc-pt, w8a16, bf16, auto, or a recipe JSON file"),
        (["--recipe", "auto", "--max-kl", "-1"], "a positive mean KL budget"),
        (["--recipe", "auto", "--max-kl", "0.1", "--max-bf16-fraction", "1.5"], "expected 0 ... 1"),
    ],
)
def test_cli_refuses_bad_recipe_options(tmp_path, mixed_ckpt, extra, message):
    from builder.cli.app import main

    result = CliRunner().invoke(main, ["quantize", str(mixed_ckpt), str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "unreadable recipe"),
        ('{"layers": {"0": "fp8"}}', "expected {'default': FORMAT"),
        ('{"default": "fp9"}', "default: unknown format 'fp9'"),
        ('{"default": "fp8", "overrides": {"0.mlp": "bf16"}}', "unit '0.mlp' is not a linear"),
    ],
)
def test_cli_refuses_a_bad_recipe_file_before_calibrating(tmp_path, mixed_ckpt, text, message):
    """One error line naming what is wrong (for an unknown unit, also what the units are
    called), exit 2, no output; the recipe file is left as it was."""
    from builder.cli.app import main

    recipe = tmp_path / "recipe.json"
    recipe.write_text(text)
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["quantize", str(mixed_ckpt), str(out), "--recipe", str(recipe)]
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    if "not a linear" in message:
        assert "units are LAYER.KIND" in errors[0] and "0.qkv" in errors[0]
    assert recipe.read_text() == text and not out.exists()


def test_plan_recipe_memory_matches_the_planner_for_uniform_fp8(tmp_path):
    """All-FP8 per-tensor must cost exactly what the planner counts for an FP8 target; three
    blocks in BF16 cost one byte more per parameter they hold (per rank)."""
    from builder.cli.app import main

    def memory(recipe):
        path = tmp_path / "r.json"
        path.write_text(json.dumps(recipe))
        args = [
            "plan",
            "--preset",
            "ultra-253b",
            "--target",
            "h100x4-fp8",
            "--recipe",
            str(path),
            "--json",
        ]
        result = CliRunner().invoke(main, args)
        assert result.exit_code in (0, 1), result.output
        return json.loads(result.output)["plans"][0]["recipe_memory"]

    fp8 = memory({"default": "fp8"})
    assert fp8["weights_per_rank"] == fp8["planned_weights_per_rank"]
    mixed = memory({"default": "fp8", "overrides": {"0.down": "bf16"}})
    plan = preset_plan("ultra-253b")
    hidden, width = plan.hidden_size, plan.layers[0].ffn_width
    extra = hidden * width // 4 - 8  # 1 more byte per parameter on each of the 4 ranks
    assert [
        m - f for m, f in zip(mixed["weights_per_rank"], fp8["weights_per_rank"], strict=True)
    ] == [extra] * 4


def test_bf16_sensitivity_measures_and_removes_the_rounding_floor(ultra_ckpt, windows):
    """In bf16 any perturbation decorrelates the later roundings; the floor stream of a block
    (its linears computed in fp32 and rounded back: no quantization) costs KL by itself, and
    a candidate's own KL is what it adds beyond that."""
    sens = measure_sensitivity(ultra_ckpt, windows, None, (PC,), "block", torch.bfloat16)
    blocks = {int(k.split()[1]) for k in sens.kl}
    assert set(sens.floor) == blocks
    assert all(v >= 0 for v in sens.floor.values())
    for key in sens.kl:
        raw = sens.kl[key]["fp8-pc-pt"]
        assert raw / 100 <= sens.own(key, "fp8-pc-pt") <= raw
