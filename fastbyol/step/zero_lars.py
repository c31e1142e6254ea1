"""LARS under DeepSpeed ZeRO (stages 0-3) with the exact per-layer trust ratio.

The math (``fastbyol.step.lars``; BYOL.md, "Optimiser"). For each parameter tensor p with gradient g and
momentum buffer m, per step:

    u = g + wd * p                              (u = g for biases and BatchNorm parameters: 'excluded')
    r = eta * ||p|| / ||u||                     (r = 1 if either norm is 0, or if p is excluded)
    m = momentum * m + r * u
    p = p - lr * m

Why a plain LARS is wrong under ZeRO. From stage 1 on, DeepSpeed does not hand the client optimizer the
model's tensors: it hands it, per parameter group, ONE flat fp32 tensor, this rank's slice of the group's
parameters laid end to end (stages 1/2), or the concatenation of this rank's shard of every parameter of
a sub-group (stage 3). A per-tensor optimizer then takes each norm over whatever it is given: one norm
for a whole partition (many layers at once, cut anywhere), so ||p|| and ||u|| are neither a layer's nor
the same on two ranks, and the step depends on the number of ranks. ``ZeroLARS`` reads the partition
layout once (``attach``), and each step computes, per tensor, the partial sums sum p^2 and sum u^2 over
the pieces of it this rank holds, adds them over the ranks with ONE all-reduce of a [T, 2] fp32 tensor
(T = the tensors of the partition), and applies the update with the whole tensors' trust ratios. The
excluded group needs no norm: it is stepped with no communication. Elements of a partition that belong
to no tensor (alignment padding) are never read or written.

The layouts read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py``);
``attach`` checks them and raises a one-line error naming the DeepSpeed version when they do not hold:

* Stage 0: no ZeRO optimizer. With fp32 training ``engine.optimizer`` is the client optimizer itself and
  its groups hold the model's tensors: ``ZeroLARS`` is ``fastbyol.step.lars.LARS`` (its foreach step,
  whatever ``kernels``).
* Stages 1 and 2 (``DeepSpeedZeroOptimizer``, ``engine.optimizer``; the client is its ``.optimizer``).
  Per client group i: ``round_robin_bit16_groups[i]`` are the group's trainable tensors in flat order,
  at ``round_robin_bit16_offsets[i]`` (element offsets into the group's flat buffer
  ``bit16_groups_flat[i]``, which ``round_robin_bit16_padding[i]`` alignment gaps separate and whose end
  is padded to a multiple of 2 x world size). Rank r owns the slice
  [r * partition_size[i], (r + 1) * partition_size[i]) of it (``get_data_parallel_partitions``: equal
  slices), as the fp32 copy ``single_partition_of_fp32_groups[i]``, which is the group's only
  ``'params'`` entry. ``step()`` calls ``_optimizer_step(i)`` once per group, with the client's
  ``param_groups`` narrowed to ``[group i]`` for the call and the fp32 slice's ``.grad`` set to the
  reduced, flattened gradient slice (same layout).
* Stage 3 (``DeepSpeedZeroOptimizer_Stage3``). Each client group is cut into sub-groups of whole tensors
  (``fp16_groups[s]``, client group ``sub_group_to_group_id[s]``). Every parameter p is split over the
  ranks of ``sub_group_process_groups[s]`` in equal shards of ``p.partition_numel()`` =
  ceil(p.ds_numel / world) elements (``p.ds_tensor``); rank r holds elements
  [r * partition_numel, (r + 1) * partition_numel) of p flattened, the last ranks' tail being padding
  (not initialised). ``fp32_partitioned_groups_flat[s]`` is this rank's shards of the sub-group's
  tensors end to end. The client groups' ``'params'`` are empty between steps; ``_optimizer_step(s)``
  sets ``param_groups[sub_group_to_group_id[s]]['params'] = [fp32_partitioned_groups_flat[s]]`` (with
  its ``.grad`` set) for one ``step()`` call per sub-group.

Both steps are called in the same order on every rank (all sub-groups, all groups), so the one
all-reduce per partition lines up. The momentum is kept per flat partition (``state[flat]
['momentum_buffer']``, fp32, created at ``attach``): DeepSpeed's own checkpointing saves and restores it
with the client's ``state_dict`` (stages 1/2 rigid checkpoints: ``optimizer.state_dict()`` of the flat
slices; stage 3: the same after ``_set_fp32_optimizer_param_groups``), and ``step`` finds partitions by
identity, which a load keeps; ``attach`` maps the client groups by position (a load replaces their
dicts), so it may come before or after ``engine.load_checkpoint``.

Two engines: with ``kernels=None`` multi-tensor PyTorch ops over views of each tensor's piece
(``torch._foreach_norm`` for the partial sums, as ``LARS``); with ``kernels=SHARD_KERNELS`` the Triton kernels
``lars_shard_sums`` / ``lars_shard_apply`` of ``fastbyol.kernels.lars`` (on the CPU only under
``TRITON_INTERPRET=1``). Neither synchronises with the host.

DeepSpeed 0.19.8 clips gradients to norm 1.0 unless the config says ``"gradient_clipping": 0``: BYOL's
LARS does not clip, so the config must.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fastbyol.step.lars import LARS, momentum_step_, trust_ratio, weight_decayed

WRITTEN_FOR = "0.19.8"
"""The DeepSpeed release whose ZeRO layouts this module reads."""


class Piece(NamedTuple):
    """One tensor's part of a rank's flat partition."""

    offset: int
    """Where it starts in the flat partition (for an empty piece: where it would be)."""
    length: int
    """How many of the tensor's elements this rank holds (0: none)."""
    excluded: bool
    """A bias or BatchNorm parameter: no weight decay, trust ratio 1."""
    tensor: int
    """The tensor's index among the partition's tensors: the same on every rank (its row of the sums)."""


def shard_span(offset: int, numel: int, start: int, end: int) -> tuple[int, int]:
    """The part [lo, hi) of the tensor at [offset, offset + numel) of a flat buffer that falls in the shard
    [start, end) (lo == hi where none does: an empty piece, placed where it would be)."""
    return min(max(offset, start), end), min(max(offset + numel, start), end)


@dataclass
class _Partition:
    """One flat fp32 tensor DeepSpeed steps, and its layout."""

    flat: torch.Tensor
    pieces: list[Piece]
    """All the partition's tensors, in index order; the offsets do not decrease."""
    excluded: bool
    reduce: bool
    """Whether the partial sums need adding over the ranks (ZeRO with more than one rank)."""
    live: list[Piece]
    """The pieces this rank holds (length > 0)."""
    live_index: torch.Tensor
    """int64 [len(live)]: their tensor indices."""
    layout: Any = None
    """The ``LarsLayout`` of the pieces (kernel engine)."""
    zero_sums: torch.Tensor | None = None
    """[T, 2] zeros: the sums of an excluded partition (kernel engine)."""


def _version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except ImportError:
        return "not installed"


class LayoutError(RuntimeError):
    """DeepSpeed's ZeRO layout is not the one ``ZeroLARS`` reads."""


def _fail(message: str) -> LayoutError:
    return LayoutError(f"ZeroLARS.attach: {message} (DeepSpeed {_version()}; ZeroLARS reads the ZeRO layout of "
                       f"DeepSpeed {WRITTEN_FOR})")


def _attr(obj: object, name: str) -> Any:
    if not hasattr(obj, name):
        raise _fail(f"{type(obj).__name__} has no attribute {name!r}")
    return getattr(obj, name)


class ShardKernels(NamedTuple):
    """The Triton shard kernels ZeroLARS may step with (``fastbyol.kernels.lars.SHARD_KERNELS``), handed in
    by whoever builds the run: this module never imports the kernels."""

    build_layout: Callable[..., Any]
    """``(segments, device) -> layout``: the chunk schedule of one partition's pieces."""
    sums: Callable[..., torch.Tensor]
    """``(flat, grad, layout, weight_decay) -> [T, 2]`` per-tensor partial sums of p^2 and u^2."""
    apply: Callable[..., None]
    """``(flat, grad, momentum, layout, sums, lr, weight_decay, momentum_coef, eta)``: the update in place."""


class ZeroLARS(LARS):
    """LARS (``fastbyol.step.lars.LARS``) that computes exact per-tensor trust ratios under DeepSpeed ZeRO.

    Give it ``lars_param_groups(model.named_modules())``, pass it to ``deepspeed.initialize(model=...,
    optimizer=this, config=...)`` (ZeRO needs ``"zero_allow_untested_optimizer": true``), then call
    ``attach(engine)`` once. Set the learning rate each step via ``group['lr']`` of
    ``engine.optimizer.param_groups`` (at stages 1-3 they are this optimizer's groups). Without
    ``attach`` it steps only real model tensors (plain LARS) and refuses ZeRO partitions."""

    def __init__(self, params: Iterable[dict[str, object]], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 1e-3, kernels: ShardKernels | None = None) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
        self.kernels = kernels  # None: the foreach PyTorch path
        # Before DeepSpeed rewrites the groups' 'params': the tensors of each group, in order. DeepSpeed
        # drops empty groups, and a checkpoint load replaces the group dicts: the groups it steps are these
        # non-empty ones, by position.
        self._initial: list[tuple[bool, list[torch.Tensor]]] = [
            (bool(group["excluded"]), list(group["params"])) for group in self.param_groups if group["params"]]
        self._initial_ids = {id(p) for _, params in self._initial for p in params}
        self._partitions: dict[int, _Partition] = {}
        self._stage: int | None = None
        self._lr_buf: torch.Tensor | None = None

    # -- attach ---------------------------------------------------------------------------------------

    def attach(self, engine: Any, check: bool = True) -> None:
        """Call once after deepspeed.initialize(model=..., optimizer=this ZeroLARS, config=...): read the ZeRO
        optimizer's partition layout (stage from engine.zero_optimization_stage()), build for each param
        group the list of this rank's pieces (local offset, length, excluded, global tensor index) and check it.

        ``check`` also compares the values: each piece of the fp32 partition must equal the same elements
        of its model tensor (stage 3 gathers each parameter once for this). Collective at stages 1-3: every
        rank must call it."""
        stage = int(engine.zero_optimization_stage())
        partitions: list[_Partition]
        if stage == 0:
            if engine.optimizer is not self:
                raise _fail(f"at ZeRO stage 0 the engine wraps the client optimizer in "
                            f"{type(engine.optimizer).__name__} (fp16/bf16?): ZeroLARS supports stage 0 in fp32 only")
            self._check_real_tensors("at ZeRO stage 0")
            partitions = []
        else:
            zero = engine.optimizer
            if getattr(zero, "optimizer", None) is not self:
                raise _fail(f"engine.optimizer ({type(zero).__name__}) does not wrap this ZeroLARS as .optimizer")
            partitions = self._stage_1_2(zero, check) if stage in (1, 2) else self._stage_3(zero, check)
        self._stage = stage
        self._partitions = {id(part.flat): part for part in partitions}
        if self.kernels is not None and partitions:
            device = partitions[0].flat.device
            self._lr_buf = torch.zeros(1, dtype=torch.float32, device=device)
            for part in partitions:
                segments = [(pc.offset, pc.length, pc.excluded) for pc in part.pieces]
                part.layout = self.kernels.build_layout(segments, device)
                part.zero_sums = torch.zeros(len(part.pieces), 2, dtype=torch.float32, device=device)
        for part in partitions:  # eager, so that every partition's momentum is in the state (and checkpoints)
            state = self.state[part.flat]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(part.flat, memory_format=torch.contiguous_format)

    def _check_real_tensors(self, where: str) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._initial_ids:
                    raise _fail(f"{where} a parameter group holds a tensor of shape {tuple(p.shape)} that is not "
                                "one of the model tensors ZeroLARS was built with")

    def _initial_group(self, index: int) -> tuple[bool, set[int]]:
        """(excluded, ids of its tensors) of the client group ``index`` as ZeroLARS was built."""
        if len(self.param_groups) != len(self._initial):
            raise _fail(f"the client optimizer has {len(self.param_groups)} parameter groups, ZeroLARS was built "
                        f"with {len(self._initial)} non-empty ones")
        excluded, params = self._initial[index]
        if bool(self.param_groups[index]["excluded"]) != excluded:
            raise _fail(f"client parameter group {index} is no longer the group ZeroLARS was built with")
        return excluded, {id(p) for p in params}

    @staticmethod
    def _world(process_group: Any) -> tuple[int, int]:
        import deepspeed.comm as ds_dist

        world, rank = ds_dist.get_world_size(group=process_group), ds_dist.get_rank(group=process_group)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_world_size() != world:
                raise _fail(f"ZeRO partitions over {world} ranks, not the default process group's "
                            f"{dist.get_world_size() if dist.is_initialized() else 'uninitialised'} (ZeroLARS "
                            "all-reduces its sums over the default group: data parallelism only)")
        return int(world), int(rank)

    def _partition(self, flat: torch.Tensor, pieces: list[Piece], excluded: bool, world: int) -> _Partition:
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise _fail(f"a ZeRO partition is {flat.dtype} of shape {tuple(flat.shape)}, not a contiguous flat fp32 "
                        "tensor")
        ends = [pc.offset + pc.length for pc in pieces]
        if any(pc.offset < 0 or end > flat.numel() for pc, end in zip(pieces, ends)):
            raise _fail(f"a piece lies outside its partition of {flat.numel()} elements")
        if any(b.offset < a.offset + a.length for a, b in zip(pieces, pieces[1:])):
            raise _fail("the tensors' pieces overlap or are not in tensor order in the partition")
        live = [pc for pc in pieces if pc.length]
        return _Partition(flat=flat, pieces=pieces, excluded=excluded, reduce=world > 1, live=live,
                          live_index=torch.tensor([pc.tensor for pc in live], dtype=torch.int64,
                                                  device=flat.device))

    def _stage_1_2(self, zero: Any, check: bool) -> list[_Partition]:
        if getattr(zero, "cpu_offload", False):
            raise _fail("ZeRO-Offload (offload_optimizer) is not supported")
        fp32 = _attr(zero, "single_partition_of_fp32_groups")
        tensors_by_group = _attr(zero, "round_robin_bit16_groups")
        offsets_by_group = _attr(zero, "round_robin_bit16_offsets")
        padding_by_group = _attr(zero, "round_robin_bit16_padding")
        sizes = _attr(zero, "partition_size")
        flats16 = _attr(zero, "bit16_groups_flat")
        process_groups = _attr(zero, "real_dp_process_group")
        if not len(self.param_groups) == len(fp32) == len(tensors_by_group) == len(sizes):
            raise _fail(f"{len(self.param_groups)} client parameter groups but {len(fp32)} fp32 partitions")
        partitions = []
        for i, group in enumerate(self.param_groups):
            flat = fp32[i]
            if len(group["params"]) != 1 or group["params"][0] is not flat:
                raise _fail(f"parameter group {i} does not hold exactly single_partition_of_fp32_groups[{i}]")
            excluded, known = self._initial_group(i)
            tensors, offsets, padding = tensors_by_group[i], offsets_by_group[i], padding_by_group[i]
            if any(id(t) not in known for t in tensors):
                raise _fail(f"round_robin_bit16_groups[{i}] holds a tensor that is not in client group {i}")
            numels = [t.numel() for t in tensors]
            expect = 0
            for k, (offset, numel) in enumerate(zip(offsets, numels)):
                if offset != expect:
                    raise _fail(f"group {i} tensor {k} sits at flat offset {offset}, not {expect}")
                expect = offset + numel + padding[k]
            world, rank = self._world(process_groups[i])
            size = int(sizes[i])
            if size * world != flats16[i].numel() or flat.numel() != size or expect > flats16[i].numel():
                raise _fail(f"group {i}: partition of {flat.numel()} elements, partition_size {size}, world "
                            f"{world}, flat buffer of {flats16[i].numel()} for {expect} laid out")
            start, end = rank * size, (rank + 1) * size
            pieces = []
            for k, (offset, numel) in enumerate(zip(offsets, numels)):
                lo, hi = shard_span(offset, numel, start, end)
                pieces.append(Piece(lo - start, hi - lo, excluded, k))
                if check and hi > lo:
                    mine = flat.narrow(0, lo - start, hi - lo)
                    model = tensors[k].detach().reshape(-1).narrow(0, lo - offset, hi - lo).to(flat.dtype)
                    if not torch.equal(mine, model):
                        raise _fail(f"group {i}: the fp32 partition's elements [{lo - start}, {hi - start}) differ "
                                    f"from elements [{lo - offset}, {hi - offset}) of tensor {k}")
            partitions.append(self._partition(flat, pieces, excluded, world))
        return partitions

    def _stage_3(self, zero: Any, check: bool) -> list[_Partition]:
        if getattr(zero, "offload_optimizer", False) or getattr(zero, "swap_optimizer", False):
            raise _fail("ZeRO-3 optimizer offload is not supported")
        sub_groups = _attr(zero, "fp16_groups")
        fp32 = _attr(zero, "fp32_partitioned_groups_flat")
        to_group = _attr(zero, "sub_group_to_group_id")
        process_groups = _attr(zero, "sub_group_process_groups")
        if len(fp32) != len(sub_groups):
            raise _fail(f"{len(sub_groups)} sub-groups but {len(fp32)} fp32 partitions")
        for i, group in enumerate(self.param_groups):
            if group["params"]:
                raise _fail(f"client parameter group {i} holds tensors between steps (stage 3 empties them)")
        partitions = []
        for s, params in enumerate(sub_groups):
            excluded, known = self._initial_group(to_group[s])
            if any(id(p) not in known for p in params):
                raise _fail(f"fp16_groups[{s}] holds a tensor that is not in client group {to_group[s]}")
            flat = fp32[s]
            world, rank = self._world(process_groups[s])
            pieces, offset = [], 0
            for k, p in enumerate(params):
                numel, shard = int(_attr(p, "ds_numel")), int(p.partition_numel())
                if shard != math.ceil(numel / world) or p.ds_tensor.numel() != shard:
                    raise _fail(f"sub-group {s} tensor {k}: shards of {shard} elements for {numel} over {world} ranks")
                start = rank * shard
                length = max(0, min(shard, numel - start))
                pieces.append(Piece(offset, length, excluded, k))
                if check and length and not torch.equal(flat.narrow(0, offset, length),
                                                        p.ds_tensor.narrow(0, 0, length).to(flat.dtype)):
                    raise _fail(f"sub-group {s}: the fp32 partition at {offset} differs from tensor {k}'s ds_tensor")
                offset += shard
            if offset != flat.numel():
                raise _fail(f"sub-group {s}: shards of {offset} elements in a partition of {flat.numel()}")
            if check:
                self._check_gathered(params, pieces, flat, rank, s)
            partitions.append(self._partition(flat, pieces, excluded, world))
        return partitions

    @staticmethod
    def _check_gathered(params: list[torch.Tensor], pieces: list[Piece], flat: torch.Tensor, rank: int,
                        sub_group: int) -> None:
        """Each rank's shard of each parameter is the slice [rank * shard, ...) of the whole tensor."""
        import deepspeed

        for k, (p, pc) in enumerate(zip(params, pieces)):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if pc.length:
                    shard = int(_attr(p, "partition_numel")())
                    whole = p.detach().reshape(-1).narrow(0, rank * shard, pc.length)
                    if not torch.equal(flat.narrow(0, pc.offset, pc.length), whole.to(flat.dtype)):
                        raise _fail(f"sub-group {sub_group}: rank {rank}'s shard of tensor {k} is not elements "
                                    f"[{rank} * partition_numel, ...) of the gathered tensor")

    # -- step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One LARS step of the tensors (stage 0) or partitions (stages 1-3) DeepSpeed hands over now."""
        if self._stage is None or self._stage == 0:
            if self._stage is None:
                for group in self.param_groups:
                    if any(id(p) not in self._initial_ids for p in group["params"]):
                        raise RuntimeError("ZeroLARS is stepping DeepSpeed ZeRO partitions, not model tensors: call "
                                           "optimizer.attach(engine) after deepspeed.initialize")
            super().step()
            return
        for group in self.param_groups:
            for p in group["params"]:
                part = self._partitions.get(id(p))
                if part is None or part.flat is not p:
                    raise RuntimeError(f"ZeroLARS got a tensor of shape {tuple(p.shape)} that is no ZeRO partition "
                                       "attach() recorded: call attach(engine) again")
                if p.grad is None:  # a rank that skipped would leave the others waiting in the all-reduce
                    raise RuntimeError("ZeroLARS got a ZeRO partition without its gradient")
                state = self.state[p]
                if "momentum_buffer" not in state:  # e.g. a checkpoint saved before attach
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                if self.kernels is not None:
                    self._step_kernels(self.kernels, part, group, p.grad, state["momentum_buffer"])
                else:
                    self._step_torch(part, group, p.grad, state["momentum_buffer"])

    @staticmethod
    def _all_reduce(sums: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(sums)  # SUM over the default group: T x 2 floats per partition

    def _step_torch(self, part: _Partition, group: dict[str, Any], grad: torch.Tensor, buf: torch.Tensor) -> None:
        views = [(part.flat.narrow(0, pc.offset, pc.length), grad.narrow(0, pc.offset, pc.length),
                  buf.narrow(0, pc.offset, pc.length)) for pc in part.live]
        params, grads, bufs = [v[0] for v in views], [v[1] for v in views], [v[2] for v in views]
        if part.excluded:
            updates = grads
        else:
            updates = weight_decayed(grads, params, group["weight_decay"]) if views else []
            sums = torch.zeros(len(part.pieces), 2, dtype=torch.float32, device=part.flat.device)
            if views:
                partial = torch.stack([torch.stack(torch._foreach_norm(params)),
                                       torch.stack(torch._foreach_norm(updates))], dim=1).square()
                sums.index_copy_(0, part.live_index, partial)
            if part.reduce:
                self._all_reduce(sums)
            p_norm, u_norm = sums.sqrt().unbind(1)
            trust = trust_ratio(p_norm, u_norm, group["eta"])
            if views:
                torch._foreach_mul_(updates, list(trust.index_select(0, part.live_index).unbind(0)))
        if views:
            momentum_step_(params, bufs, updates, group["momentum"], group["lr"])

    def _step_kernels(self, kernels: ShardKernels, part: _Partition, group: dict[str, Any], grad: torch.Tensor,
                      buf: torch.Tensor) -> None:
        assert self._lr_buf is not None and part.zero_sums is not None
        self._lr_buf.fill_(group["lr"])  # an async write of a host float: no sync
        weight_decay = group["weight_decay"]
        if part.excluded:
            sums = part.zero_sums  # trust ratio 1 whatever the sums: no norms, no communication
        else:
            sums = kernels.sums(part.flat, grad, part.layout, weight_decay)
            if part.reduce:
                self._all_reduce(sums)
        kernels.apply(part.flat, grad, buf, part.layout, sums, self._lr_buf, weight_decay, group["momentum"],
                         group["eta"])
