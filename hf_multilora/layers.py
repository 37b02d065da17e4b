"""The LoRA step of one targeted linear layer: y = base(x), then y += SGMV delta, in place.

One `LoraRuntime` is shared by every LoRA layer of a model. It holds the adapter residency (adapter
rows in pool pages) and the plan of the current forward (built once by routing, reused by every
layer), and picks Triton on CUDA and plain PyTorch (`sgmv.TorchLora`) elsewhere. Projections that
read the same input (q/k/v, gate/up) are siblings: the first one's shrink covers all of them in one
multi-slice launch and the others reuse it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .backend import use_triton
from .kernels import sgmv
from .memory.page_pool import PagePool
from .memory.residency import AdapterResidency
from .transfer import to_device

_SIBLING_SETS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"})


@dataclass(frozen=True)
class _Group:
    first: int  # module index of the group's first member
    size: int


def sibling_groups(module_names: Sequence[str]) -> list[_Group]:
    """For each module index, the run of consecutive sibling projections it belongs to."""
    groups: list[_Group] = []
    i = 0
    while i < len(module_names):
        parent, leaf = _split(module_names[i])
        family = next((s for s in _SIBLING_SETS if leaf in s), None)
        j = i + 1
        while family and j < len(module_names) and _split(module_names[j])[0] == parent:
            if _split(module_names[j])[1] not in family:
                break
            j += 1
        groups += [_Group(i, j - i)] * (j - i)
        i = j
    return groups


def _split(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


@dataclass
class _Recipe:
    """Everything one module's LoRA step needs under the current plan, prepared on first use.

    The launches bake in the activations' dtype and row strides; a call whose x or y differ in
    those goes through the general path.
    """

    shrink: sgmv.ShrinkCall  # the group's multi-slice shrink (shared by its members)
    expand: sgmv.ExpandCall
    dtype: torch.dtype
    x_shape: tuple[int, int]
    y_shape: tuple  # y's (a stacked recipe's: each output's)


def add_lora_to_forward(
    module: torch.nn.Module, index: int, runtime_of: Callable[[], LoraRuntime | None]
) -> Callable[[], None]:
    """Make `module` add the LoRA delta of the current plan to its output; returns the undo.

    An instance-level forward rather than a forward hook: hooks push every call of the module
    through nn.Module's slow path, which costs more host time than the LoRA launches themselves.
    """
    had_own_forward = "forward" in module.__dict__
    base_forward = module.forward

    def lora_step(x: torch.Tensor, y: torch.Tensor) -> None:
        runtime = runtime_of()
        if (
            runtime is not None
            and runtime.plan is not None
            and runtime.module_mask >> index & 1
            and runtime.owner == threading.get_ident()
        ):
            runtime.apply(index, x, y)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = base_forward(x, *args, **kwargs)
        lora_step(x, y)
        return y

    forward.lora_step = lora_step  # what decode_linears runs after computing the base part itself
    forward.base_forward = base_forward
    forward.lora_target = (runtime_of, index)  # for apply_lora_stacked

    def undo() -> None:
        if had_own_forward:
            module.forward = base_forward
        else:
            del module.forward

    module.forward = forward
    return undo


def apply_lora_stacked(forwards: Sequence[Callable], x: torch.Tensor, ys: Sequence[torch.Tensor]) -> bool:
    """Add the LoRA deltas of sibling modules, whose forwards `add_lora_to_forward` made, to their
    outputs `ys` for input x in one expand launch (ys: views of one buffer, one after another, as
    `decode_linear` leaves a group's outputs; at 7B decode the q/k/v expands are 3 launches of ~4.4
    us each). True where done (or nothing to add); False where this path does not take the call,
    and each forward's `lora_step` must then run."""
    targets = [getattr(f, "lora_target", None) for f in forwards]
    if not targets or any(t is None or t[0] is not targets[0][0] for t in targets):
        return False
    first = targets[0][1]
    if [index for _, index in targets] != list(range(first, first + len(targets))):
        return False
    runtime = targets[0][0]()
    return runtime is not None and runtime.apply_stacked(first, x, ys)


def rank_capacity(max_rank: int) -> int:
    """The rank a fixed decode plan is built for when a batch's largest rank is `max_rank`: batches
    whose ranks round up alike share its plan and so the decode graphs captured over it."""
    return max(sgmv.RANK_TILE, 1 << (max_rank - 1).bit_length())


@dataclass
class _FixedDecode:
    """A decode plan whose addresses stay put across calls, for steps replayed from CUDA graphs: one
    GEMV tile per row (so the launch grids depend on the batch size only), and the rows' adapter
    locations and scales gathered into fixed tables, rewritten in place when the rows change. A row
    without adapter, and a module its adapter does not target, have rank 0 there: the kernels skip
    them. `max_rank` is a power-of-two capacity, so calls whose adapters' ranks fit it share it."""

    plan: sgmv.SgmvPlan
    locations: torch.Tensor  # [modules, rows, LOCATION_FIELDS]
    scales: torch.Tensor  # [modules, rows]
    workspace: torch.Tensor
    recipes: dict[int | tuple[str, int], _Recipe]  # prepared launches; they read `rows`, so they go when it is replaced
    templates: dict[tuple, Any]  # the launches recipes are prepared from (see LoraRuntime._prepare)
    rows: torch.Tensor  # the adapter residency's row table when the recipes were prepared

    @classmethod
    def build(cls, runtime: LoraRuntime, rows: int, max_rank: int) -> _FixedDecode:
        device, modules = runtime.residency.device, len(runtime.module_names)
        token = torch.arange(rows, dtype=torch.int32)
        packed = torch.cat([token, token, torch.zeros_like(token), token, token + 1]).to(device)
        plan = sgmv.SgmvPlan(
            num_tokens=rows, token_slots=packed[:rows], sorted_tokens=packed[rows : 2 * rows],
            tiles=packed[2 * rows :].view(3, rows), num_tiles=rows, block_m=1, max_rank=max_rank, slots=(),
        )  # fmt: skip
        need = max(sgmv.shrink_workspace_numel(plan, size) for size in {g.size for g in runtime.groups})
        return cls(
            plan,
            torch.zeros(modules, rows, sgmv.LOCATION_FIELDS, dtype=torch.int64, device=device),
            torch.zeros(modules, rows, dtype=torch.float32, device=device),
            torch.empty(need, dtype=torch.float32, device=device),
            {},
            {},
            runtime.residency.rows,
        )

    def fill(self, row_slots: Sequence[int], residency: AdapterResidency) -> None:
        """Gather the rows' adapter metadata into the fixed tables (device ops, no sync)."""
        slots = to_device(row_slots, residency.device, torch.int64)
        valid = slots >= 0
        index = slots.clamp(min=0)
        self.locations.copy_(residency.locations.index_select(1, index) * valid[None, :, None])
        self.scales.copy_(residency.scales.index_select(1, index) * valid[None, :])


class LoraCapture(NamedTuple):
    """What a forward under the runtime's current plan reads besides the pool and the tables (a
    captured graph keeps it alive): the plan, its prepared launches and shrink workspace, the fixed
    decode tables, and the adapter residency's row table (replaced when it grows)."""

    plan: sgmv.SgmvPlan | None
    recipes: dict
    workspace: torch.Tensor | None
    fixed: _FixedDecode | None
    rows: torch.Tensor


class LoraRuntime:
    def __init__(self, module_names: Sequence[str], pool: PagePool) -> None:
        self.module_names = list(module_names)
        self.residency = AdapterResidency(self.module_names, pool)
        self.groups = sibling_groups(self.module_names)
        self.plan: sgmv.SgmvPlan | None = None
        # The thread whose routed call the plan belongs to: the base model is shared, and a plain
        # call of it from another thread meanwhile must not pick up that call's adapters.
        self.owner: int | None = None
        self.module_mask = 0
        self._plan_key: tuple | None = None
        self._recipes: dict[int | tuple[str, int], _Recipe] = {}  # by module, and ("stacked", group first)
        # A module's launches are prepared as variants of the first ones of their shape under the plan
        # (keyed by kind and shapes): one Triton specialization per shape, not per module.
        self._templates: dict[tuple, Any] = {}
        self._torch_loras: dict[int, sgmv.TorchLora] = {}  # without Triton: per module, for _torch_version
        self._torch_version = -1
        self._workspace: torch.Tensor | None = None  # every group's shrink output, one group at a time
        # The adapter locations and scales of the plan's tiles, [modules, tiles, ...]: gathered once
        # per plan for all modules (a prefill prepares every module's launches anew).
        self._tile_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernels = False
        # (input, group first) whose v the workspace holds: siblings reuse it until another shrink
        self._shrunk: tuple[torch.Tensor, int] | None = None
        # Set by a call whose decode steps are replayed from graphs: one-token forwards then use a
        # _FixedDecode (kept across calls, by (rows, rank capacity)) instead of a fresh plan.
        self.fixed_decode = False
        self._fixed: dict[tuple[int, int], _FixedDecode] = {}
        self._fixed_now: _FixedDecode | None = None

    def set_rows(self, row_slots: Sequence[int] | None, tokens_per_row: int) -> None:
        """Plan the coming forward. `row_slots[i]` is the device slot of row i's adapter (-1: none).

        Decode steps repeat the same rows with one token each, so the plan and the per-module
        recipes prepared under it are reused across them.
        """
        if row_slots is None or all(s < 0 for s in row_slots):
            self.clear()
            return
        residency = self.residency
        key = (tuple(row_slots), tokens_per_row, residency.version)
        if key == self._plan_key:
            return
        used = [residency.resident_at(s) for s in set(row_slots) if s >= 0]
        self.clear()
        max_rank = max(r.max_rank for r in used)
        self.owner = threading.get_ident()
        self._plan_key = key
        self._kernels = use_triton(residency.pool.storage)
        if self.fixed_decode and tokens_per_row == 1 and self._kernels:
            self._use_fixed(row_slots, max_rank)
            return
        for r in used:
            self.module_mask |= r.module_mask
        self.plan = sgmv.plan_sgmv(row_slots, tokens_per_row, max_rank, residency.device)
        if self._kernels:
            sizes = {g.size for g in self.groups}
            need = max(sgmv.shrink_workspace_numel(self.plan, size) for size in sizes)
            self._workspace = torch.empty(need, dtype=torch.float32, device=residency.device)
            self._tile_tables = tuple(sgmv.tile_view(t, self.plan) for t in (residency.locations, residency.scales))

    def _use_fixed(self, row_slots: Sequence[int], max_rank: int) -> None:
        """Plan a decode step on the fixed tables of this batch size: every LoRA module launches
        (rank 0 where a row's adapter does not target it), so the launches do not depend on the mix."""
        capacity = rank_capacity(max_rank)
        key = (len(row_slots), capacity)
        fixed = self._fixed.get(key)
        if fixed is None:
            fixed = self._fixed[key] = _FixedDecode.build(self, len(row_slots), capacity)
        if fixed.rows is not self.residency.rows:  # grown for new adapters: prepare anew (a new dict: graphs
            fixed.recipes, fixed.templates, fixed.rows = {}, {}, self.residency.rows  # may still hold the old launches)
        fixed.fill(row_slots, self.residency)
        self._fixed_now = fixed
        self.plan, self._recipes, self._templates, self._workspace = fixed.plan, fixed.recipes, fixed.templates, fixed.workspace
        self._tile_tables = (fixed.locations, fixed.scales)
        self.module_mask = (1 << len(self.module_names)) - 1

    def captured_state(self) -> LoraCapture:
        return LoraCapture(self.plan, self._recipes, self._workspace, self._fixed_now, self.residency.rows)

    def clear(self) -> None:
        self.plan, self.owner, self.module_mask, self._plan_key, self._shrunk = None, None, 0, None, None
        self._recipes, self._templates, self._workspace, self._fixed_now, self._tile_tables = {}, {}, None, None, None

    def apply(self, module: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the LoRA delta of module `module` to y (the base layer's output for input x), in place."""
        recipe = self._recipes.get(module)
        if (
            recipe is not None
            and x.dtype is recipe.dtype
            and y.dtype is recipe.dtype
            and x.is_contiguous()
            and y.is_contiguous()
        ):
            x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            if x2.shape == recipe.x_shape and y2.shape == recipe.y_shape:
                self._run(module, recipe, x, x2, y2)
                return y
        return self._apply_general(module, x, y)

    def apply_stacked(self, first: int, x: torch.Tensor, ys: Sequence[torch.Tensor]) -> bool:
        """See `apply_lora_stacked`: sibling group `first`'s shrink (shared, as ever) and one expand
        into all of ys."""
        if (
            self.plan is None
            or self.owner != threading.get_ident()
            or not self._kernels
            or self.groups[first] != _Group(first, len(ys))
        ):
            return False
        if not self.module_mask >> first & ((1 << len(ys)) - 1):
            return True  # no adapter of the batch targets these modules
        dtype = self.residency.dtype
        if x.dtype != dtype or not x.is_contiguous() or any(y.dtype != dtype or not y.is_contiguous() for y in ys):
            return False
        x2, ys2 = x.view(-1, x.shape[-1]), [y.view(-1, y.shape[-1]) for y in ys]
        if x2.shape[0] != self.plan.num_tokens:
            return False
        key = ("stacked", first)
        recipe = self._recipes.get(key)
        if recipe is None or (x2.shape, tuple(y.shape for y in ys2)) != (recipe.x_shape, recipe.y_shape):
            recipe = self._prepare_stacked(first, x2, ys2)
        if not (self._shrunk is not None and self._shrunk[0] is x and self._shrunk[1] == first):
            recipe.shrink(x2)
            self._shrunk = (x, first)
        recipe.expand(ys2)
        return True

    def _apply_general(self, module: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != self.plan.num_tokens:
            raise RuntimeError(
                f"layer {self.module_names[module]} got {x2.shape[0]} tokens but the batch was planned "
                f"for {self.plan.num_tokens}; pass adapter_ids with the call that runs this forward"
            )
        dtype = self.residency.dtype
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        out = y if y.is_contiguous() and y.dtype == dtype else y.contiguous().to(dtype)
        out2 = out.view(-1, out.shape[-1])
        if self._kernels:
            self._apply_kernels(module, x, x2, out2)
        else:
            self._apply_reference(module, x2, out2)
        if out is not y:
            y.copy_(out)
        return y

    def _apply_kernels(self, module: int, x: torch.Tensor, x2: torch.Tensor, out2: torch.Tensor) -> None:
        recipe = self._recipes.get(module)
        if recipe is None or (x2.shape, out2.shape, x2.dtype) != (
            recipe.x_shape,
            recipe.y_shape,
            recipe.dtype,
        ):
            recipe = self._prepare(module, x2.contiguous(), out2)
        self._run(module, recipe, x, x2.contiguous(), out2)

    def _run(
        self, module: int, recipe: _Recipe, x: torch.Tensor, x2: torch.Tensor, out2: torch.Tensor
    ) -> None:
        group = self.groups[module]
        reusable = self._shrunk is not None and self._shrunk[0] is x and self._shrunk[1] == group.first
        if group.size == 1 or not reusable:
            recipe.shrink(x2)
            self._shrunk = (x, group.first) if group.size > 1 else None
        recipe.expand(out2)

    def _prepare(self, module: int, x2: torch.Tensor, out2: torch.Tensor) -> _Recipe:
        """Plan once, run many: the launches of this module under the current plan, variants of the
        first ones of their shapes. All groups share one shrink workspace: a group's v is used by
        its members before any other shrink runs."""
        residency, plan, group = self.residency, self.plan, self.groups[module]
        tile_locations, tile_scales = self._tile_tables
        first = self._recipes.get(group.first) if group.first != module else None
        members = slice(group.first, group.first + group.size)
        shrink = first.shrink if first else self._variant_of(
            ("shrink", group.size, x2.shape, x2.dtype),
            lambda: sgmv.ShrinkCall(x2, residency.pool.storage, residency.rows, residency.locations[members], plan,
                                    out=self._workspace, tile_locations=tile_locations[members]),
            tile_locations[members],
        )  # fmt: skip
        position, m = module - group.first, slice(module, module + 1)
        v, tables = shrink.v[:, position : position + 1], (tile_locations[m], tile_scales[m])
        expand = self._variant_of(
            ("expand", out2.shape, out2.dtype, shrink.v.shape),
            lambda: sgmv.ExpandCall(out2, v, residency.pool.storage, residency.rows, residency.locations[m],
                                    residency.scales[m], plan, tile_tables=tables),
            v, tables,
        )  # fmt: skip
        self._recipes[module] = _Recipe(shrink, expand, x2.dtype, tuple(x2.shape), tuple(out2.shape))
        return self._recipes[module]

    def _prepare_stacked(self, first: int, x2: torch.Tensor, ys2: list[torch.Tensor]) -> _Recipe:
        """The group's shrink (its first member's recipe's) and an expand into a tensor per member."""
        shrink = self._recipes.get(first)
        shrink = (shrink if shrink is not None and shrink.x_shape == tuple(x2.shape) else
                  self._prepare(first, x2, ys2[0])).shrink  # fmt: skip
        residency, tile_locations, tile_scales = self.residency, *self._tile_tables
        members = slice(first, first + len(ys2))
        tables = (tile_locations[members], tile_scales[members])
        shapes = tuple(tuple(y.shape) for y in ys2)
        expand = self._variant_of(
            ("expand stacked", shapes, x2.dtype, shrink.v.shape),
            lambda: sgmv.ExpandCall(ys2, shrink.v, residency.pool.storage, residency.rows,
                                    residency.locations[members], residency.scales[members], self.plan,
                                    tile_tables=tables),
            shrink.v, tables,
        )  # fmt: skip
        recipe = self._recipes[("stacked", first)] = _Recipe(shrink, expand, x2.dtype, tuple(x2.shape), shapes)
        return recipe

    def _variant_of(self, key: tuple, prepare: Callable[[], Any], *tables: Any) -> Any:
        """The launch of `key`'s shapes for these tables: a variant of the first one prepared under
        the plan (a ShrinkCall or ExpandCall), or, the first time, `prepare()`'s."""
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = prepare()
            return template
        return template.variant(*tables)

    def _apply_reference(self, module: int, x2: torch.Tensor, out2: torch.Tensor) -> None:
        """The plain-PyTorch path (CPU): the module's `TorchLora`, which keeps the matrices of the slots
        it has seen; all are dropped when the adapter residency changes (its version)."""
        residency = self.residency
        if self._torch_version != residency.version:
            self._torch_loras, self._torch_version = {}, residency.version
        lora = self._torch_loras.get(module)
        if lora is None:
            m = slice(module, module + 1)
            lora = self._torch_loras[module] = sgmv.TorchLora(
                residency.pool.storage, residency.rows, residency.locations[m], residency.scales[m], x2.shape[1], (0, out2.shape[1])
            )
        lora(x2, out2, self.plan)
