"""All map strategies of the MaskInversion solver agree with the naive (official) double backward."""

import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import make_masks
from helpers.eva import tiny_eva01
from regionembed.backbones import UnsupportedModelError
from regionembed.explainers import LeGrad
from regionembed.explainers.legrad import attention_pool_features
from regionembed.inversion import MaskInversion
from regionembed.inversion.strategies import (
    STRATEGIES,
    PerStepStrategy,
    PrecomputedStrategy,
    attention_pool_shape,
    attention_pool_table_shape,
    decomposition_issue,
    estimate_costs,
    legrad_pool_queries,
)

FAST = ["naive_lean", "per_step", "precomputed"]


@pytest.fixture(scope="module")
def eva01_backbone():
    return tiny_eva01(layer_scale=False, seed=0)


@pytest.fixture(scope="module")
def eva01_ls_backbone():
    return tiny_eva01(layer_scale=True, seed=0)


def _run_all(backbone, image, masks, layers=(-1,), **config):
    explainer = LeGrad(layers)
    return {
        name: MaskInversion(explainer, strategy=name, **config)(backbone, image, masks) for name in ["naive", *FAST]
    }


@pytest.mark.parametrize(
    ("name", "layers", "size"),
    [
        ("tiny_backbone", (-1,), 32),
        ("tiny_backbone", (0, 1), 48),  # non-native size: resampled positional embeddings
        ("tiny_ls_backbone", (-1,), 48),  # layer scale, QuickGELU, LN after pooling
        ("tiny_ls_backbone", (0, 1, 2), 48),
        ("timm_backbone", (-1,), 64),
        ("eva01_backbone", (-1,), 32),  # EVA01's timm EvaBlock: q/v biases, GELU Mlp
        ("eva01_backbone", (0, 1), 48),
        ("eva01_ls_backbone", (-1,), 32),  # with EVA's layer scale (gamma_1, gamma_2)
        ("eva01_ls_backbone", (0, 1), 48),
    ],
)
def test_strategies_agree_with_naive(request, name, layers, size):
    backbone = request.getfixturevalue(name)
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)
    masks = make_masks(4, 24, 20)
    results = _run_all(backbone, image, masks, layers=layers, alpha=0.1, iterations=6)
    ref = results["naive"]
    for strategy in FAST:
        res = results[strategy]
        assert res.strategy == strategy
        torch.testing.assert_close(res.maps, ref.maps, atol=1e-5, rtol=0, msg=strategy)
        assert F.cosine_similarity(res.embeddings, ref.embeddings).min() >= 0.9999, strategy
        torch.testing.assert_close(res.loss_history, ref.loss_history, atol=1e-5, rtol=0, msg=strategy)


@pytest.mark.parametrize(("layer_scale", "seed", "layers"), [(False, 3, (0, -1)), (True, 4, (-1,))])
def test_eva01_strategies_agree_with_naive_in_float64(layer_scale, seed, layers):
    """EVA01's blocks in float64, with float32 rounding out of the way, on other draws of the weights: the decomposed
    formulas are exact (maps 1e-10). The layer-scale tower drawn with seed 4 is sensitive to rounding: in float32
    its last-block maps differ from naive's by about 2e-5 after min-max, here by about 1e-13."""
    b = tiny_eva01(layer_scale=layer_scale, seed=seed).double()
    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    masks = make_masks(4, 24, 20).double()
    results = _run_all(b, image, masks, layers=layers, alpha=0.1, iterations=6)
    ref = results["naive"]
    for strategy in FAST:
        res = results[strategy]
        torch.testing.assert_close(res.maps, ref.maps, atol=1e-10, rtol=0, msg=strategy)
        torch.testing.assert_close(res.loss_history, ref.loss_history, atol=1e-12, rtol=0, msg=strategy)
        torch.testing.assert_close(res.embeddings, ref.embeddings, atol=1e-10, rtol=0, msg=strategy)


def test_decomposed_gradient_equals_double_backward(tiny_ls_backbone):
    """One step: the first-order gradient of the decomposed map equals the naive second-order one."""
    b = tiny_ls_backbone
    image = torch.randn(1, 3, 48, 48)
    e0 = F.normalize(torch.randn(3, b.embed_dim), dim=-1)
    weights = torch.rand(3, 48, 48)
    grads = {}
    for name in ["naive_lean", "per_step", "precomputed"]:
        strategy = STRATEGIES[name](b, image, [0, -1], 3, 1e-12)
        e = e0.clone().requires_grad_(True)
        loss = (strategy.maps(e) * weights).sum()
        grads[name] = strategy.gradient(loss, e)
        strategy.close()
    torch.testing.assert_close(grads["per_step"], grads["naive_lean"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["precomputed"], grads["naive_lean"], atol=1e-5, rtol=1e-4)


def test_precomputed_table_is_the_per_step_map(tiny_backbone):
    image = torch.randn(1, 3, 32, 32)
    per = PerStepStrategy(tiny_backbone, image, [-1], 2, 1e-12)
    pre = PrecomputedStrategy(tiny_backbone, image, [-1], 2, 1e-12, chunk_bytes=4096)  # forces several chunks
    e = torch.randn(5, tiny_backbone.embed_dim)
    torch.testing.assert_close(pre.d_heads(0, e), per.d_heads(0, e), atol=1e-6, rtol=1e-5)


class _LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that operators create inside the mode (CPU has no allocator
    statistics): a storage counts from the first operator that returns it until the last tensor on it is freed;
    ``external`` tensors' storages (the model's weights, the image) are not counted."""

    def __init__(self, external=()):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.refs, self.live, self.peak = {}, 0, 0

    def _release(self, key):
        ref = self.refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            del self.refs[key]
            self.live -= ref[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.external or storage.nbytes() == 0:
                continue
            if key in self.refs:
                self.refs[key][0] += 1
            else:
                self.refs[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def test_precomputed_tabulates_in_place(tiny_backbone):
    """The table is allocated once and filled: the peak while tabulating is the table and one chunk's working memory,
    not the chunks and their concatenation (twice the table)."""
    b = tiny_backbone
    image = torch.randn(1, 3, 64, 64)  # 65 tokens: the table (32 x 65 x 48 floats) outweighs the other terms
    external = [*b.parameters(), *b.buffers(), image]
    with _LiveBytes(external) as per_step:
        per = PerStepStrategy(b, image, [-1], 2, 1e-12)
    kept = per_step.live  # what per_step keeps (its terms), the base the table comes on top of
    tokens, hidden = per.terms[0].act_grad.shape
    del per
    with _LiveBytes(external) as mem:
        pre = PrecomputedStrategy(b, image, [-1], 2, 1e-12, chunk_bytes=4 * tokens * hidden)  # one vector a chunk
    table = sum(t.numel() * t.element_size() for t in pre.tables)
    assert table == estimate_costs(b, 64, 2, 10, 1)["precomputed"].memory
    assert mem.live == kept + table  # the tracker sees what the strategy keeps
    assert mem.peak - kept <= 1.5 * table  # concatenating chunks measured 2.0x


def test_table_estimates_follow_the_models_dtype(tiny_backbone):
    """A float64 model's tables take twice a float32 model's bytes, and the estimate says so (it assumed 4 bytes)."""
    import copy

    double = copy.deepcopy(tiny_backbone).double()
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    pre = PrecomputedStrategy(double, image, [-1], 2, 1e-12)
    table = sum(t.numel() * t.element_size() for t in pre.tables)
    assert pre.tables[0].dtype == torch.float64
    assert table == estimate_costs(double, 64, 2, 10, 1)["precomputed"].memory
    assert table == 2 * estimate_costs(tiny_backbone, 64, 2, 10, 1)["precomputed"].memory


def test_estimates_read_the_image_towers_dtype():
    """Only the image tower cast to float64 (open_clip's first parameter, logit_scale, stays float32): the pool's
    shape is read on the tower's dtype, and the table is estimated at 8 bytes a float."""
    from regionembed.backbones import OpenCLIPBackbone

    b = OpenCLIPBackbone("re-tiny-coca", tokenizer=False)
    single = estimate_costs(b, 32, 2, 2, 1)["attention_pool"].memory
    b.model.visual.double()
    b.clear_attention_pool_shapes()
    assert estimate_costs(b, 32, 2, 2, 1)["attention_pool"].memory == 2 * single


def test_precomputed_respects_the_memory_budget(tiny_backbone, caplog):
    """An explicit ``precomputed`` over ``memory_budget_mb`` raises as ``attention_pool`` does; ``auto`` runs
    ``per_step`` instead and says why."""
    b = tiny_backbone
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    table_mb = estimate_costs(b, 32, 2, 2, 1)["precomputed"].memory / 2**20
    tiny = table_mb / 2
    message = (
        rf"'precomputed' would tabulate about {table_mb:.1f} MB .*T=17 x C=48.*memory_budget_mb={tiny:g}.*'per_step'"
    )
    with pytest.raises(ValueError, match=message):
        MaskInversion(strategy="precomputed", memory_budget_mb=tiny)(b, image, masks)
    with pytest.raises(ValueError, match=r"each of 2 layer"):  # two tables: twice the memory
        MaskInversion(LeGrad((0, 1)), strategy="precomputed", memory_budget_mb=table_mb * 1.5).plan(b, 32, 2)
    assert MaskInversion(strategy="precomputed", memory_budget_mb=table_mb).plan(b, 32, 2) == "precomputed"
    # one block named twice ((1, -1) on two blocks) is one table: the budget counts distinct blocks
    aliased = MaskInversion(LeGrad((1, -1)), strategy="precomputed", memory_budget_mb=table_mb * 1.5)
    assert aliased.plan(b, 32, 2) == "precomputed"
    assert MaskInversion(memory_budget_mb=table_mb).plan(b, 32, 5000) == "precomputed"  # cheaper for many masks
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        assert MaskInversion(memory_budget_mb=tiny).plan(b, 32, 5000) == "per_step"
    assert "strategy auto runs 'per_step' (the precomputed table" in caplog.text


def test_precomputed_on_a_tail_without_the_formulas_names_the_issue(tiny_backbone, monkeypatch):
    """The budget check needs the block's dimensions: a block the formulas do not cover is refused by the strategy,
    not by a crash in the estimate."""
    monkeypatch.setattr(tiny_backbone, "block_parts", lambda block: None)
    with pytest.raises(UnsupportedModelError, match=r"precomputed strategy cannot run.*pre-norm form"):
        MaskInversion(strategy="precomputed", memory_budget_mb=0)(
            tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(2, 16, 16)
        )


def test_naive_restores_the_backbone(tiny_backbone):
    flags = [p.requires_grad for p in tiny_backbone.parameters()]
    MaskInversion(strategy="naive", iterations=2)(tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(2, 16, 16))
    assert [p.requires_grad for p in tiny_backbone.parameters()] == flags
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_auto_picks_by_cost_and_memory():
    from regionembed.backbones import OpenCLIPBackbone

    b = OpenCLIPBackbone("re-small-vit")
    solver = MaskInversion()
    assert solver.plan(b, 64, 1) == "per_step"
    assert solver.plan(b, 64, 500) == "precomputed"
    assert MaskInversion(memory_budget_mb=0.001).plan(b, 64, 500) == "per_step"
    assert MaskInversion(strategy="naive").plan(b, 64, 500) == "naive"


def test_naive_restores_the_backbone_when_it_fails(tiny_backbone, monkeypatch):
    flags = [p.requires_grad for p in tiny_backbone.parameters()]

    def boom(tokens):
        raise MemoryError("simulated")

    monkeypatch.setattr(tiny_backbone, "pool_tokens", boom)
    with pytest.raises(MemoryError):
        MaskInversion(strategy="naive")(tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(2, 16, 16))
    assert [p.requires_grad for p in tiny_backbone.parameters()] == flags


def test_auto_falls_back_to_naive_when_the_block_tail_does_not_fit(tiny_backbone, monkeypatch, caplog):
    monkeypatch.setattr(tiny_backbone, "block_parts", lambda block: None)  # e.g. a block without the pre-norm form
    assert decomposition_issue(tiny_backbone, [-1]) is not None
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        assert MaskInversion().plan(tiny_backbone, 32, 2) == "naive"
    assert "strategy auto runs 'naive'" in caplog.text and "pre-norm form" in caplog.text
    with pytest.raises(UnsupportedModelError, match=r"per_step strategy cannot run.*strategy='naive'"):
        MaskInversion(strategy="per_step")(tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(2, 16, 16))


@pytest.fixture(scope="module", params=["re-tiny-coca", "re-tiny-siglip"])
def pool_backbone(request):
    from regionembed.backbones import OpenCLIPBackbone

    torch.manual_seed(0)
    return OpenCLIPBackbone(request.param, tokenizer=False).requires_grad_(False)


def test_attention_pool_estimate_is_the_table_it_builds(pool_backbone):
    """The memory estimate of ``attention_pool`` is the size of the tables the strategy allocates (D x H*Q_s*T' floats
    per layer, Q_s the pool queries LeGrad reads: CoCa's first of 8, SigLIP's one), at the native size and another
    one."""
    b = pool_backbone
    for size, layers in ((32, [-1]), (48, [0, 1])):
        strategy = STRATEGIES["attention_pool"](b, torch.randn(1, 3, size, size), layers, 2, 1e-12)
        built = sum(table.numel() * table.element_size() for table in strategy.tables)
        estimate = estimate_costs(b, size, 2, 10, len(layers))
        assert set(estimate) == {"attention_pool"}  # the decomposed strategies do not apply to a pool head
        assert estimate["attention_pool"].memory == built
        heads, queries, keys = attention_pool_shape(b, size)
        read = attention_pool_table_shape(b, size)
        assert read == (heads, 1, keys)  # re-tiny-coca: 8 queries, LeGrad reads the first; re-tiny-siglip: 1 query
        assert queries == (8 if b.legrad_recipe == "coca" else 1)
        assert [t.shape for t in strategy.tables] == [(b.embed_dim, heads * keys)] * len(layers)  # Q times smaller


def test_attention_pool_gradient_is_zero_off_the_queries_legrad_reads(pool_backbone):
    """What lets the table keep only ``legrad_pool_queries``: the gradient of LeGrad's pooled score with respect to
    the pool's attention is exactly zero on every other query's row, and not on those (checked on the full
    gradient)."""
    b = pool_backbone
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = b.forward_blocks(b.embed_tokens(image))
    with torch.enable_grad():
        features, probs = attention_pool_features(b, tokens)
        e = F.normalize(torch.randn(3, b.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
        (grad,) = torch.autograd.grad(features[0], probs, grad_outputs=e, is_grads_batched=True)  # [3, 1, H, Q, T']
    queries = legrad_pool_queries(b, probs.shape[2])
    others = [q for q in range(probs.shape[2]) if q not in queries]
    assert queries == ([0] if b.legrad_recipe == "coca" else list(range(probs.shape[2])))
    assert grad[:, :, :, others].abs().max() == 0 if others else True
    assert grad[:, :, :, queries].abs().amax(dim=(0, 1, 2, 4)).min() > 0


def test_attention_pool_queries_out_of_range_are_named(pool_backbone, monkeypatch):
    b = pool_backbone
    queries = attention_pool_shape(b, 32)[1]
    for bad in ((queries,), ()):
        monkeypatch.setattr(b, "legrad_pool_queries", bad)
        with pytest.raises(ValueError, match=rf"legrad_pool_queries=\(.*\) must name some of the pool's {queries}"):
            MaskInversion().plan(b, 32, 2)


def test_attention_pool_respects_the_memory_budget(pool_backbone, caplog):
    b = pool_backbone
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    table_mb = estimate_costs(b, 32, 2, 2, 1)["attention_pool"].memory / 2**20
    tiny = table_mb / 2
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        result = MaskInversion(iterations=2, memory_budget_mb=tiny)(b, image, masks)
    assert result.strategy == "naive"  # auto falls back, saying why
    assert "strategy auto runs 'naive'" in caplog.text and f"memory_budget_mb={tiny:g}" in caplog.text
    assert MaskInversion(memory_budget_mb=table_mb).plan(b, 32, 2) == "attention_pool"  # the budget is inclusive
    assert MaskInversion(memory_budget_mb=tiny).plan_with_reason(b, 32, 2) == (
        "naive",
        f"the attention_pool table, about {table_mb:.1f} MB, is over memory_budget_mb={tiny:g}",
    )
    heads, _, keys = attention_pool_shape(b, 32)
    queries = "Q=1 of 8, those LeGrad reads" if b.legrad_recipe == "coca" else "Q=1"  # the table's dimensions
    shape = rf"D={b.embed_dim} x H={heads} x {queries} x T'={keys} floats"
    with pytest.raises(ValueError, match=rf"about {table_mb:.1f} MB \({shape}.*memory_budget_mb={tiny:g}"):
        MaskInversion(strategy="attention_pool", memory_budget_mb=tiny)(b, image, masks)
    with pytest.raises(ValueError, match=r"each of 2 layer"):  # two tables: twice the memory
        MaskInversion(LeGrad((0, 1)), strategy="attention_pool", memory_budget_mb=table_mb * 1.5).plan(b, 32, 2)
    assert MaskInversion(strategy="attention_pool", memory_budget_mb=table_mb).plan(b, 32, 2) == "attention_pool"
    # the last block named twice is one table
    aliased = MaskInversion(LeGrad((len(b.blocks) - 1, -1)), memory_budget_mb=table_mb * 1.5)
    assert aliased.plan(b, 32, 2) == "attention_pool"


def test_bench_records_the_table_estimate():
    from regionembed.bench.inversion import markdown_table, run_case

    pool = run_case("re-tiny-coca", 96, 2, 1, "attention_pool")
    plain = run_case("re-tiny-vit", 32, 2, 1, "per_step")
    # D x H x Q_s x T' = 32 x 4 x 1 x 145 floats (12x12 patches and [CLS]; the first of 8 queries): 0.07 MB
    assert pool["ran"] == "attention_pool" and pool["table_estimate_mb"] == 0.1
    assert plain["table_estimate_mb"] is None  # no table
    rows = markdown_table([pool, plain]).splitlines()
    assert rows[2].split("|")[10].strip() == "0.1" and rows[3].split("|")[10].strip() == "-"
    assert rows[2].split("|")[11].strip() == "-"  # no naive run to compare with: no ratio (it printed "nanx")


def test_plan_reads_the_pool_shape_once_per_backbone_and_size(monkeypatch):
    """``plan`` needs the pool's (H, Q, T') for the table estimate; it runs the blank pool forward once per backbone and
    image size, not on every call."""
    from regionembed.backbones import OpenCLIPBackbone

    torch.manual_seed(0)
    b = OpenCLIPBackbone("re-tiny-siglip", tokenizer=False).requires_grad_(False)
    calls = []
    pool = b.attention_pool_embed
    monkeypatch.setattr(b, "attention_pool_embed", lambda tokens: calls.append(tokens.shape) or pool(tokens))
    assert MaskInversion().plan(b, 32, 2) == "attention_pool"
    assert len(calls) == 1
    assert MaskInversion().plan(b, 32, 2) == "attention_pool"
    assert MaskInversion(strategy="attention_pool", iterations=3).plan(b, 32, 7) == "attention_pool"
    assert MaskInversion(memory_budget_mb=0).plan(b, 32, 2) == "naive"
    assert len(calls) == 1  # kept on the backbone: any solver, any number of masks
    shape = attention_pool_shape(b, 48)
    assert len(calls) == 2  # another size: one more forward
    assert shape[:2] == attention_pool_shape(b, 32)[:2] and shape[2] > attention_pool_shape(b, 32)[2]
    assert MaskInversion().plan(b, 48, 2) == "attention_pool" and len(calls) == 2
    b.clear_attention_pool_shapes()  # after swapping the pool or the patch embedding
    assert MaskInversion().plan(b, 32, 2) == "attention_pool" and len(calls) == 3
    other = OpenCLIPBackbone("re-tiny-siglip", tokenizer=False)  # a new backbone has its own shapes
    assert MaskInversion().plan(other, 32, 2) == "attention_pool" and len(calls) == 3
    assert attention_pool_shape(other, 32) == attention_pool_shape(b, 32)
