"""SGMV Triton kernels against their plain-PyTorch references, and the references against a
per-token float64 oracle. On CPU the kernels run under TRITON_INTERPRET=1 (see conftest)."""

import pytest
import torch
from conftest import DEVICE

from hf_multilora.kernels import sgmv
from hf_multilora.kernels.sgmv import (
    WEIGHT_ALIGN,
    TorchLora,
    align_up,
    plan_sgmv,
    sgmv_expand,
    sgmv_expand_reference,
    sgmv_shrink,
    sgmv_shrink_reference,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def make_adapters(ranks, in_features, slice_widths, dtype, seed, untargeted=()):
    """Random adapters whose rank rows sit in shuffled, non-adjacent places of one flat storage (as
    in pool pages), found through a row table; A is [rank, in], B is stored as [rank, out]. Gaps
    and row padding hold random values that must never be read.

    ranks[slot] is the adapter's rank; (slot, slice) pairs in `untargeted` get rank 0.
    Returns (weights, rows, locations, scales).
    """
    gen = torch.Generator().manual_seed(seed)
    n_slots, n_slices = len(ranks), len(slice_widths)
    locations = torch.zeros(n_slices, n_slots, 3, dtype=torch.int64)
    row_values: list[torch.Tensor] = []
    for slot in range(n_slots):
        for s, width in enumerate(slice_widths):
            rank = 0 if (slot, s) in untargeted else ranks[slot]
            a = torch.randn(rank, in_features, generator=gen) / in_features**0.5
            b_t = torch.randn(rank, width, generator=gen) / max(rank, 1) ** 0.5
            locations[s, slot] = torch.tensor([len(row_values), len(row_values) + rank, rank])
            row_values += [*a, *b_t]
    pieces, starts, offset = [], [0] * len(row_values), 0
    for i in torch.randperm(len(row_values), generator=gen).tolist():
        gap = WEIGHT_ALIGN * int(torch.randint(0, 3, (1,), generator=gen))
        row = row_values[i]
        pieces += [torch.randn(gap, generator=gen), row, torch.randn(align_up(row.numel()) - row.numel(), generator=gen)]
        starts[i] = offset + gap
        offset += gap + align_up(row.numel())
    weights = torch.cat(pieces).to(dtype)
    rows = torch.tensor(starts, dtype=torch.int64)
    scales = (torch.rand(n_slices, n_slots, generator=gen) * 2 + 0.25).float()
    return weights.to(DEVICE), rows.to(DEVICE), locations.to(DEVICE), scales.to(DEVICE)


def oracle(x, y, weights, rows, locations, scales, token_slots, offsets):
    """float64, one token at a time: what SGMV means."""
    k = x.shape[1]
    out = y.double().cpu().clone()
    w, row_starts, loc = weights.double().cpu(), rows.cpu().tolist(), locations.cpu().tolist()

    def matrix(first, rank, width):
        return torch.stack([w[o : o + width] for o in row_starts[first : first + rank]])

    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        for s in range(len(offsets) - 1):
            a_row, b_row, rank = loc[s][slot]
            if rank:
                width = offsets[s + 1] - offsets[s]
                a, b_t = matrix(a_row, rank, k), matrix(b_row, rank, width)
                out[t, offsets[s] : offsets[s + 1]] += (b_t.T @ (a @ x[t].double().cpu())) * scales[
                    s, slot
                ].item()
    return out


CASES = {
    # name: (row_slots, tokens_per_row, ranks, in_features, slice_widths, untargeted)
    "all_rows_none": ([-1, -1, -1], 5, [16, 8], 64, [48], ()),
    "one_adapter_prefill": ([0, 0, 0], 37, [16], 96, [80], ()),
    "all_distinct_decode": ([3, 0, 5, 1, 4, 2, 6], 1, [8, 16, 32, 64, 16, 8, 24], 72, [40], ()),
    "decode_small_segments": ([0, 2, 0, -1, 1, 0], 1, [24, 16, 8], 160, [96, 32], ((2, 1),)),
    "mixed_ranks_repeats_and_base": ([2, -1, 0, 2, 1, -1, 0], 3, [5, 64, 24], 136, [104], ()),
    "multi_slice_gqa": ([1, 0, -1, 1, 2], 4, [16, 8, 32], 64, [64, 16, 16], ((0, 1), (2, 2))),
    "odd_tokens_long_segments": ([0, 1, 0], 45, [16, 48], 40, [24, 56], ()),
    "unaligned_widths_and_input": ([0, 1, -1, 0, 1], 2, [8, 16], 50, [37, 21, 13], ((1, 2),)),
}


def case_inputs(case, dtype, seed):
    """A case's adapters (from `seed`), random x and y (from seed + 1), y's slice offsets and the plan."""
    row_slots, tokens_per_row, ranks, k, widths, untargeted = CASES[case]
    weights, rows, locations, scales = make_adapters(ranks, k, widths, dtype, seed, untargeted)
    gen = torch.Generator().manual_seed(seed + 1)
    n_tokens = len(row_slots) * tokens_per_row
    x = torch.randn(n_tokens, k, generator=gen).to(dtype).to(DEVICE)
    y0 = torch.randn(n_tokens, sum(widths), generator=gen).to(dtype).to(DEVICE)
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    plan = plan_sgmv(row_slots, tokens_per_row, max(ranks), DEVICE)
    return weights, rows, locations, scales, x, y0, offsets, plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case, dtype):
    widths = CASES[case][4]
    weights, rows, locations, scales, x, y0, offsets, plan = case_inputs(case, dtype, sum(map(ord, case)) + int(dtype.itemsize))

    v = sgmv_shrink(x, weights, rows, locations, plan)
    v_ref = sgmv_shrink_reference(x, weights, rows, locations, plan)
    token_slots = plan.token_slots.tolist()
    loc = locations.cpu().tolist()
    for t, slot in enumerate(token_slots):
        for s in range(len(widths)):
            rank = loc[s][slot][2] if slot >= 0 else 0
            if rank:
                torch.testing.assert_close(
                    v.sum(0)[s, t, :rank].cpu(), v_ref[0, s, t, :rank].cpu(), rtol=TOLERANCE[dtype], atol=1e-3
                )

    y, y_ref = y0.clone(), y0.clone()
    sgmv_expand(y, v, weights, rows, locations, scales, plan, offsets)
    sgmv_expand_reference(y_ref, v_ref, weights, rows, locations, scales, plan, offsets)
    expected = oracle(x, y0, weights, rows, locations, scales, token_slots, offsets)

    untouched = torch.tensor([s < 0 for s in token_slots])
    assert torch.equal(y.cpu()[untouched], y0.cpu()[untouched]), "rows without adapter must be left untouched"
    for got in (y, y_ref):
        err = (got.double().cpu() - expected).norm() / (expected - y0.double().cpu()).norm().clamp_min(1e-12)
        assert err < TOLERANCE[dtype], f"relative error {err:.2e} of the LoRA delta"


@pytest.mark.parametrize("merge", ["never", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_lora_matches_reference(case, dtype, merge, monkeypatch):
    """The path without Triton (matrices kept per slot; per adapter, or one masked product over all
    adapters, as `merge` forces) against the references, under the case's plan, a decode plan of the
    same rows and the first plan again (a prepared module meets several plans): rows of one adapter
    apart (a gather), rows without adapter (never touched), several slices, ranks, untargeted slices."""
    monkeypatch.setattr(sgmv, "_MERGE_MACS", 0 if merge == "never" else 1 << 62)
    row_slots, tokens_per_row, ranks, k, widths, untargeted = CASES[case]
    seed = sum(map(ord, case)) + 7
    weights, rows, locations, scales = make_adapters(ranks, k, widths, dtype, seed, untargeted)
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    lora = TorchLora(weights, rows, locations, scales, k, offsets)
    first = plan_sgmv(row_slots, tokens_per_row, max(ranks), DEVICE)
    for plan in (first, plan_sgmv(row_slots, 1, max(ranks), DEVICE), first):
        x = torch.randn(plan.num_tokens, k, generator=gen).to(dtype).to(DEVICE)
        y0 = torch.randn(plan.num_tokens, sum(widths), generator=gen).to(dtype).to(DEVICE)
        y, y_ref = y0.clone(), y0.clone()
        lora(x, y, plan)
        v_ref = sgmv_shrink_reference(x, weights, rows, locations, plan)
        sgmv_expand_reference(y_ref, v_ref, weights, rows, locations, scales, plan, offsets)
        untouched = torch.tensor([s < 0 for s in plan.token_slots.tolist()])
        assert torch.equal(y.cpu()[untouched], y0.cpu()[untouched]), "rows without adapter must be left untouched"
        torch.testing.assert_close(y.float().cpu(), y_ref.float().cpu(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        if not untouched.all():
            assert not torch.allclose(y.float(), y0.float(), atol=10 * TOLERANCE[dtype]), "no delta was added"


def test_torch_lora_rejects_inputs_off_the_plan():
    weights, rows, locations, scales = make_adapters([8], 32, [16], torch.float32, 0)
    lora = TorchLora(weights, rows, locations, scales, 32, [0, 16])
    plan = plan_sgmv([0, -1], 3, 8, DEVICE)
    with pytest.raises(ValueError, match="do not fit the plan's 6 tokens"):
        lora(torch.randn(4, 32, device=DEVICE), torch.randn(4, 16, device=DEVICE), plan)
    with pytest.raises(ValueError, match="slice_offsets"):
        lora(torch.randn(6, 32, device=DEVICE), torch.randn(6, 8, device=DEVICE), plan)


def test_plan_groups_tokens_by_slot_in_tiles():
    plan = plan_sgmv([2, -1, 0, 2], 20, 16, "cpu")
    assert plan.slots == (0, 2)
    assert plan.token_slots.tolist() == [2] * 20 + [-1] * 20 + [0] * 20 + [2] * 20
    assert plan.sorted_tokens.tolist() == list(range(40, 60)) + list(range(0, 20)) + list(range(60, 80))
    assert plan.block_m == 64
    slots, starts, ends = plan.tiles.tolist()
    assert (slots, starts, ends) == ([0, 2], [0, 20], [20, 60])


def test_plan_decode_uses_small_tiles():
    plan = plan_sgmv(list(range(40)), 1, 16, "cpu")
    assert plan.block_m == 1 and plan.num_tiles == 40


def test_shrink_rejects_mismatched_dtype():
    weights, rows, locations, _ = make_adapters([8], 32, [32], torch.float32, 0)
    plan = plan_sgmv([0], 2, 8, DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        sgmv_shrink(torch.randn(2, 32, dtype=torch.float16, device=DEVICE), weights, rows, locations, plan)


def test_references_reject_unaligned_rows():
    """The kernels read weights with aligned vector loads; the CPU path enforces the same contract."""
    weights, rows, locations, _ = make_adapters([8], 32, [32], torch.float32, 0)
    rows[3] += 1
    with pytest.raises(ValueError, match="multiples of"):
        sgmv_shrink_reference(torch.randn(2, 32, device=DEVICE), weights, rows, locations, plan_sgmv([0], 2, 8, DEVICE))


def stacked_copies(y, widths, gap):
    """y's column slices copied into one buffer one after another (`gap` elements before each), as
    `decode_linear` leaves a group's outputs: a contiguous [tokens, width] tensor per slice."""
    tokens, offsets = y.shape[0], [0, *torch.tensor(widths).cumsum(0).tolist()]
    buffer = torch.randn(sum(gap + tokens * w for w in widths), device=y.device).to(y.dtype)
    outputs, start = [], 0
    for w, a, b in zip(widths, offsets[:-1], offsets[1:], strict=True):
        start += gap
        outputs.append(buffer[start : start + tokens * w].view(tokens, w).copy_(y[:, a:b]))
        start += tokens * w
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["decode_small_segments", "multi_slice_gqa", "unaligned_widths_and_input"])
def test_expand_into_a_tensor_per_slice_equals_the_column_slices(case, dtype):
    """The sibling projections' outputs of one decode_linear launch get their LoRA deltas in one
    expand: each slice addressed from the first output; the same values as the slices as columns."""
    widths = CASES[case][4]
    weights, rows, locations, scales, x, y0, offsets, plan = case_inputs(case, dtype, seed=5)
    v = sgmv_shrink(x, weights, rows, locations, plan)
    for gap in (0, 3):
        columns, reference_columns = y0.clone(), y0.clone()
        sgmv_expand(columns, v, weights, rows, locations, scales, plan, offsets)
        sgmv_expand_reference(reference_columns, v, weights, rows, locations, scales, plan, offsets)
        outputs, reference_outputs = stacked_copies(y0, widths, gap), stacked_copies(y0, widths, gap)
        sgmv_expand(outputs, v, weights, rows, locations, scales, plan)
        sgmv_expand_reference(reference_outputs, v, weights, rows, locations, scales, plan)
        assert torch.equal(torch.cat(outputs, 1), columns)
        assert torch.equal(torch.cat(reference_outputs, 1), reference_columns)
        assert not torch.equal(columns, y0)


def test_an_expand_into_a_tensor_per_slice_refuses_outputs_placed_otherwise():
    widths = [16, 8]
    weights, rows, locations, scales = make_adapters([8], 32, widths, torch.float32, 0)
    plan = plan_sgmv([0, 0], 1, 8, DEVICE)
    v = sgmv_shrink(torch.randn(2, 32, device=DEVICE), weights, rows, locations, plan)
    y = torch.randn(2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="views of one buffer"):
        sgmv.ExpandCall([torch.randn(2, 16, device=DEVICE), torch.randn(2, 8, device=DEVICE)], v, weights, rows,
                        locations, scales, plan)  # fmt: skip
    with pytest.raises(ValueError, match="a tensor per slice"):
        sgmv.ExpandCall(stacked_copies(y, widths, 0), v, weights, rows, locations, scales, plan, [0, 16, 24])
    call = sgmv.ExpandCall(stacked_copies(y, widths, 0), v, weights, rows, locations, scales, plan)
    call(stacked_copies(y, widths, 0))  # the same layout in another buffer
    with pytest.raises(ValueError, match="placed otherwise"):
        call(stacked_copies(y, widths, 8))
    with pytest.raises(ValueError, match="placed otherwise"):
        call(y)


def test_expand_rejects_bad_slice_offsets():
    weights, rows, locations, scales = make_adapters([8], 32, [16], torch.float32, 0)
    plan = plan_sgmv([0], 2, 8, DEVICE)
    y = torch.randn(2, 16, device=DEVICE)
    v = sgmv_shrink(torch.randn(2, 32, device=DEVICE), weights, rows, locations, plan)
    with pytest.raises(ValueError, match="slice_offsets"):
        sgmv_expand(y, v, weights, rows, locations, scales, plan, [0, 8, 32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama_shapes_on_gpu():
    """Real Triton at serving shapes: 32 distinct rank-16 adapters, decode and prefill, bf16."""
    weights, rows, locations, scales = make_adapters([16] * 32, 4096, [4096, 1024, 1024], torch.bfloat16, 7)
    for tokens_per_row in (1, 128):
        plan = plan_sgmv(list(range(32)), tokens_per_row, 16, DEVICE)
        x = torch.randn(32 * tokens_per_row, 4096, device=DEVICE, dtype=torch.bfloat16)
        y0 = torch.randn(32 * tokens_per_row, 6144, device=DEVICE, dtype=torch.bfloat16)
        offsets = [0, 4096, 5120, 6144]
        y, y_ref = y0.clone(), y0.clone()
        sgmv_expand(y, sgmv_shrink(x, weights, rows, locations, plan), weights, rows, locations, scales, plan, offsets)
        v_ref = sgmv_shrink_reference(x, weights, rows, locations, plan)
        sgmv_expand_reference(y_ref, v_ref, weights, rows, locations, scales, plan, offsets)
        delta, delta_ref = (y.float() - y0.float()), (y_ref.float() - y0.float())
        assert ((delta - delta_ref).norm() / delta_ref.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepared_calls_relaunch_correctly_on_new_inputs():
    """ShrinkCall/ExpandCall launch through the compiled launcher after the first call; new inputs,
    including a misaligned one (which must go back through Triton's own path), stay correct."""
    from hf_multilora.kernels.sgmv import ExpandCall, ShrinkCall

    weights, rows, locations, scales = make_adapters([16, 8, 32], 256, [192], torch.bfloat16, 11)
    plan = plan_sgmv([2, 0, -1, 1, 2], 3, 32, DEVICE)
    storage = torch.randn(15 * 256 + 1, device=DEVICE, dtype=torch.bfloat16)
    inputs = [torch.randn(15, 256, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    inputs.append(storage[1:].view(15, 256))  # 2-byte offset: not 16-byte aligned
    shrink = ShrinkCall(inputs[0], weights, rows, locations, plan)
    y_template = torch.empty(15, 192, device=DEVICE, dtype=torch.bfloat16)
    expand = ExpandCall(y_template, shrink.v, weights, rows, locations, scales, plan)
    for x in inputs * 2:
        y0 = torch.randn(15, 192, device=DEVICE, dtype=torch.bfloat16)
        y, y_ref = y0.clone(), y0.clone()
        shrink(x)
        expand(y)
        sgmv_expand_reference(
            y_ref, sgmv_shrink_reference(x, weights, rows, locations, plan), weights, rows, locations, scales, plan
        )
        delta, delta_ref = y.float() - y0.float(), y_ref.float() - y0.float()
        assert ((delta - delta_ref).norm() / delta_ref.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_layers_in_a_cuda_graph_see_finished_inputs():
    """Decode launches may start before the kernel ahead of them has finished (PDL, Hopper+). A
    chain of layers -- GEMM into y, shrink into one workspace shared by all layers, expand into y,
    y the next layer's input -- replayed in a CUDA graph and run eagerly must match the references,
    with every buffer poisoned with NaN first so that an early read shows."""
    from hf_multilora.kernels.sgmv import ExpandCall, ShrinkCall, shrink_workspace_numel

    n_layers, hidden, dtype = 4, 4096, torch.bfloat16
    weights, rows, locations, scales = make_adapters([16] * 32, hidden, [hidden], dtype, 13)
    plan = plan_sgmv(list(range(32)), 1, 16, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    base = [
        torch.randn(hidden, hidden, device=DEVICE, dtype=dtype, generator=gen) / hidden**0.5
        for _ in range(n_layers)
    ]
    x0 = torch.randn(32, hidden, device=DEVICE, dtype=dtype, generator=gen)
    ys = [torch.empty(32, hidden, device=DEVICE, dtype=dtype) for _ in range(n_layers)]
    workspace = torch.empty(shrink_workspace_numel(plan, 1, hidden), device=DEVICE)
    inputs = [x0, *ys[:-1]]
    shrinks = [ShrinkCall(x, weights, rows, locations, plan, out=workspace) for x in inputs]
    expands = [
        ExpandCall(y, s.v, weights, rows, locations, scales, plan) for y, s in zip(ys, shrinks, strict=True)
    ]

    def forward():
        for x, w, y, shrink, expand in zip(inputs, base, ys, shrinks, expands, strict=True):
            torch.mm(x, w.T, out=y)
            shrink(x)
            expand(y)

    expected = x0
    for w in base:
        v = sgmv_shrink_reference(expected, weights, rows, locations, plan)
        expected = expected @ w.T
        sgmv_expand_reference(expected, v, weights, rows, locations, scales, plan)

    def check(run):
        for buffer in (*ys, workspace):
            buffer.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        assert ((ys[-1].float() - expected.float()).norm() / expected.float().norm()) < 2e-2

    forward()  # the first launches, ordinary ones, compile the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    for _ in range(3):
        check(graph.replay)
        check(forward)


def test_bound_launch_takes_the_kernel_arguments_by_name_in_order():
    from hf_multilora.kernels import sgmv
    from hf_multilora.kernels.launch import BoundLaunch

    names = sgmv._sgmv_shrink_kernel.arg_names
    x = torch.zeros(2, 16, device=DEVICE)
    args = dict.fromkeys(names[:17], 0) | {"x_ptr": x}
    constexprs = dict.fromkeys(names[17:], 1)
    BoundLaunch(sgmv._sgmv_shrink_kernel, (1, 1, 1), args, constexprs, num_warps=4)  # accepted, not launched
    swapped = dict(zip([names[1], names[0], *names[2:17]], args.values(), strict=True))
    with pytest.raises(ValueError, match="_sgmv_shrink_kernel takes"):
        BoundLaunch(sgmv._sgmv_shrink_kernel, (1, 1, 1), swapped, constexprs, num_warps=4)
    with pytest.raises(ValueError, match="then constexprs"):
        BoundLaunch(sgmv._sgmv_shrink_kernel, (1, 1, 1), args, dict(list(constexprs.items())[:-1]), num_warps=4)


def test_prepared_calls_do_not_keep_their_activations_alive():
    """A prefill prepares a shrink and an expand per LoRA module; holding the tensors they were
    planned and called with kept every layer's input and output of the forward alive at once."""
    import gc
    import weakref

    from hf_multilora.kernels.sgmv import ExpandCall, ShrinkCall

    weights, rows, locations, scales = make_adapters([16, 8], 64, [48], torch.float32, 5)
    plan = plan_sgmv([1, 0, -1], 2, 16, DEVICE)
    x, y = torch.randn(6, 64, device=DEVICE), torch.randn(6, 48, device=DEVICE)
    shrink = ShrinkCall(x, weights, rows, locations, plan)
    expand = ExpandCall(y, shrink.v, weights, rows, locations, scales, plan)
    shrink(x)
    expand(y)
    gone = [weakref.ref(x), weakref.ref(y)]
    del x, y
    gc.collect()
    assert all(ref() is None for ref in gone)
    shrink(torch.randn(6, 64, device=DEVICE))  # still launches on new inputs
    expand(torch.randn(6, 48, device=DEVICE))


def test_a_variant_prepared_call_equals_one_prepared_anew_for_its_tables():
    """A prefill prepares each module's launches as variants of the first ones of their shape (one
    Triton specialization per shape, not per module): a variant for another module's tables must
    be the launch prepared anew for them, argument for argument, and compute its delta."""
    from hf_multilora.kernels.sgmv import ExpandCall, ShrinkCall, tile_view

    # four "modules": a q/k/v-like group of three slices (0-2) and a group of one (3), all 48 wide
    weights, rows, locations, scales = make_adapters([16, 8, 24], 64, [48] * 4, torch.float32, 21,
                                                     untargeted={(1, 3)})  # fmt: skip
    plan = plan_sgmv([2, 0, -1, 1], 5, 24, DEVICE)
    tile_locations, tile_scales = tile_view(locations, plan), tile_view(scales, plan)
    x = torch.randn(20, 64, device=DEVICE)
    workspace = torch.empty(sgmv.shrink_workspace_numel(plan, 3), device=DEVICE)
    group = ShrinkCall(x, weights, rows, locations[0:3], plan, out=workspace, tile_locations=tile_locations[0:3])
    alone = ShrinkCall(x, weights, rows, locations[3:4], plan, out=workspace, tile_locations=tile_locations[3:4])
    y = torch.randn(20, 48, device=DEVICE)
    tables = lambda m: (tile_locations[m : m + 1], tile_scales[m : m + 1])  # noqa: E731
    first = ExpandCall(y, group.v[:, 0:1], weights, rows, locations[0:1], scales[0:1], plan, tile_tables=tables(0))
    for module in (1, 2):
        fresh = ExpandCall(y, group.v[:, module : module + 1], weights, rows, locations[module : module + 1],
                           scales[module : module + 1], plan, tile_tables=tables(module))  # fmt: skip
        variant = first.variant(group.v[:, module : module + 1], tables(module))
        launch, expected = variant._launch, fresh._launch
        assert (launch._grid, launch._tail, launch._constexprs) == (expected._grid, expected._tail, expected._constexprs)
        assert launch._launchers is first._launch._launchers  # shares the compiled launcher
    # a shrink of one slice, as a variant of another module's
    other = ShrinkCall(x, weights, rows, locations[2:3], plan, out=workspace, tile_locations=tile_locations[2:3])
    variant = other.variant(tile_locations[3:4])
    assert variant._launch._tail == alone._launch._tail and variant._launch._grid == alone._launch._grid
    # and it computes module 3's delta
    y0 = torch.randn(20, 48, device=DEVICE)
    out = y0.clone()
    variant(x)
    single = ExpandCall(y, other.v[:, 0:1], weights, rows, locations[2:3], scales[2:3], plan, tile_tables=tables(2))
    single.variant(alone.v[:, 0:1], tables(3))(out)
    expected = y0.clone()
    v_ref = sgmv_shrink_reference(x, weights, rows, locations[3:4], plan)
    sgmv_expand_reference(expected, v_ref, weights, rows, locations[3:4], scales[3:4], plan)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(out, y0)  # adapters 0 and 2 target module 3: the delta is not zero


def test_a_variant_shares_compiled_launchers_only_where_triton_would_compile_the_same_code():
    from hf_multilora.kernels.sgmv import ExpandCall, ShrinkCall

    weights, rows, locations, scales = make_adapters([16, 8], 64, [48, 48], torch.float32, 4)
    plan = plan_sgmv([1, 0], 4, 16, DEVICE)
    x, y = torch.randn(8, 64, device=DEVICE), torch.randn(8, 48, device=DEVICE)
    shrink = ShrinkCall(x, weights, rows, locations, plan)
    expand = ExpandCall(y, shrink.v[:, 0:1], weights, rows, locations[0:1], scales[0:1], plan)
    launch = expand._launch
    # loc_ptr and scale_ptr are in do_not_specialize_on_alignment: any address shares
    storage = torch.zeros(launch._fixed[3].numel() + 1, dtype=torch.int64, device=DEVICE)
    odd_locations = storage[1:].view(launch._fixed[3].shape)  # 8 bytes off: not 16-byte aligned
    assert launch.variant(loc_ptr=odd_locations)._launchers is launch._launchers
    # v_ptr is specialized on alignment: a v 4 bytes off gets launchers of its own
    v = launch._fixed[0]
    spare = torch.zeros(shrink.v.numel() + 4, device=DEVICE)
    at = lambda offset: spare.as_strided(v.shape, v.stride(), offset)  # noqa: E731
    assert launch.variant(v_ptr=at(1))._launchers is not launch._launchers
    assert launch.variant(v_ptr=at(4))._launchers is launch._launchers  # 16 bytes off
    with pytest.raises(ValueError, match="v_ptr must be like the one it replaces"):
        launch.variant(v_ptr=torch.zeros(v.numel() + 1, device=DEVICE))
    with pytest.raises(ValueError, match="not one of its fixed tensor arguments"):
        launch.variant(num_tiles=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="not one of its fixed tensor arguments"):
        launch.variant(y_ptr=y)  # the activation is given per call
    for constexpr in ("BLOCK_M", "no_such_argument"):
        with pytest.raises(ValueError, match="not one of its fixed tensor arguments"):
            launch.variant(**{constexpr: torch.zeros(1, device=DEVICE)})
