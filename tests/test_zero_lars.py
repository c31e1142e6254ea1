"""ZeroLARS under DeepSpeed ZeRO 0-3 on two gloo CPU ranks: three steps on half batches equal three steps of
``fastbyol.step.lars.LARS`` on the full batch in one process, with either engine (PyTorch / Triton
kernels); a plain LARS under ZeRO 1/2 (trust ratios of whole partitions) does not; a checkpoint saved and
loaded through DeepSpeed resumes the same trajectory, momentum included; ``attach`` refuses a layout it
does not understand. One spawn runs every case (DeepSpeed's import and start-up are the slow part)."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from fastbyol.kernels.lars import SHARD_KERNELS
from torch import nn

from fastbyol.step.lars import LARS, lars_param_groups
from fastbyol.step.zero_lars import ZeroLARS

HYPER = dict(weight_decay=0.05, momentum=0.9, eta=0.02)
LRS = (0.5, 1.0, 0.7)
BATCH = 8  # global; each of the two ranks gets half
WORLD = 2
STAGES = (0, 1, 2, 3)
# Other layouts of the same model: alignment gaps between tensors (stages 1/2), tensors in round-robin
# order (stage 2), a group cut into several sub-groups (stage 3; 300 elements: weights [W1] [W2 W3]).
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "stage1-aligned": (1, {"parameter_alignment": True}),
    "stage2-aligned-round-robin": (2, {"parameter_alignment": True, "round_robin_gradients": True}),
    "stage3-sub-groups": (3, {"sub_group_size": 300}),
}
CASES = {**{f"stage{stage}": (stage, {}) for stage in STAGES}, **VARIANTS}
CHECKPOINT_STAGES = (1, 2, 3)


def _model(seed: int) -> nn.Module:
    """Odd sizes, so ZeRO partitions cut tensors in the middle; no BatchNorm, so the mean of the two
    half-batch gradients is the full-batch gradient."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 23), nn.Tanh(), nn.Linear(23, 11), nn.Tanh(), nn.Linear(11, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(BATCH, 37, generator=g), torch.randn(BATCH, 3, generator=g)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


def _zero_lars(groups: list[dict[str, object]], kernels: bool) -> ZeroLARS:
    return ZeroLARS(groups, weight_decay=HYPER["weight_decay"], momentum=HYPER["momentum"], eta=HYPER["eta"],
                    kernels=SHARD_KERNELS if kernels else None)


def _reference(steps: int = len(LRS)) -> list[torch.Tensor]:
    """Plain LARS, one process, full batch."""
    model = _model(0)
    optimizer = LARS(lars_param_groups(model.named_modules()), **HYPER)
    x, y = _batch()
    for lr in LRS[:steps]:
        optimizer.zero_grad()
        _loss(model(x), y).backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


# -- the spawned ranks ----------------------------------------------------------------------------------

def _config(stage: int, zero: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": BATCH // WORLD, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage, **(zero or {})},
            "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 clips at 1.0 unless told; BYOL does not clip
            "steps_per_print": 10**9}


def _engine(stage: int, kernels: bool | None, seed: int = 0, attach: bool = True,
            zero: dict[str, Any] | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """kernels None: a plain LARS client (the naive optimizer)."""
    import deepspeed

    model = _model(seed)
    groups = lars_param_groups(model.named_modules())
    client = LARS(groups, **HYPER) if kernels is None else _zero_lars(groups, kernels)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=_config(stage, zero))
    if attach and isinstance(client, ZeroLARS):
        client.attach(engine)
    return engine, client


def _train(engine: Any, rank: int, lrs: tuple[float, ...]) -> None:
    x, y = _batch()
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for lr in lrs:
        for group in engine.optimizer.param_groups:  # at stages 1-3: the client's own groups
            group["lr"] = lr
        engine.backward(_loss(engine(x[half]), y[half]))
        engine.step()


def _full(engine: Any) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def _flats(engine: Any) -> list[torch.Tensor]:
    zero = engine.optimizer
    return list(zero.fp32_partitioned_groups_flat if engine.zero_optimization_stage() == 3
                else zero.single_partition_of_fp32_groups)


def _momenta(engine: Any, client: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [client.state[flat]["momentum_buffer"].clone() for flat in _flats(engine)]


def _layout(engine: Any) -> dict[str, Any]:
    """What makes the variants different layouts."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return {"sub_groups": len(zero.fp16_groups)}
    if engine.zero_optimization_stage() == 0:
        return {}
    return {"gaps": [list(p) for p in zero.round_robin_bit16_padding],
            "order": [list(i) for i in zero.round_robin_bit16_indices]}


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return ""


def _layout_errors(rank: int) -> dict[str, str]:
    """Stage 1: forgetting attach, a moved tensor, a wrong value; stage 3: a wrong group mapping."""
    out = {}
    engine, client = _engine(1, False, attach=False)
    zero = engine.optimizer
    offsets = zero.round_robin_bit16_offsets[0]
    offsets[1] += 1
    out["offsets"] = _error(lambda: client.attach(engine))  # type: ignore[attr-defined]
    offsets[1] -= 1
    zero.single_partition_of_fp32_groups[0].data[3] += 1.0
    out["values"] = _error(lambda: client.attach(engine))  # type: ignore[attr-defined]
    zero.single_partition_of_fp32_groups[0].data[3] -= 1.0
    out["no_attach"] = _error(lambda: _train(engine, rank, LRS[:1]))  # leaves the engine unusable
    engine, client = _engine(3, False)
    mapping = engine.optimizer.sub_group_to_group_id
    mapping[0], mapping[1] = mapping[1], mapping[0]
    out["stage3_groups"] = _error(lambda: client.attach(engine))  # type: ignore[attr-defined]
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with_shm: Any = importlib.import_module("deepspeed.comm.torch")
    with_shm.build_shm_op = lambda: None  # skip a ~45 s JIT build
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{tmp}/rendezvous",
                               rank=rank, world_size=world)
    results: dict[str, Any] = {}
    for case, (stage, zero) in CASES.items():
        for kernels in (False, True):
            engine, _ = _engine(stage, kernels, zero=zero)
            _train(engine, rank, LRS)
            results[f"{case}-kernels{kernels}"] = _full(engine)
        results[f"{case}-layout"] = _layout(engine)
    for stage in (1, 2):
        engine, _ = _engine(stage, None)
        _train(engine, rank, LRS)
        results[f"naive{stage}"] = _full(engine)
    for stage in CHECKPOINT_STAGES:
        kernels = stage == 3  # the kernel engine through one round trip too
        engine, client = _engine(stage, kernels)
        _train(engine, rank, LRS[:2])
        engine.save_checkpoint(f"{tmp}/ckpt{stage}", tag="t")
        saved = _momenta(engine, client)
        _train(engine, rank, LRS[2:])
        # Other weights: the load must replace them. Stage 2 attaches after the load (which replaces the
        # client's group dicts), the others before it.
        fresh, fresh_client = _engine(stage, kernels, seed=99, attach=stage != 2)
        fresh.load_checkpoint(f"{tmp}/ckpt{stage}", tag="t")
        if stage == 2:
            fresh_client.attach(fresh)  # type: ignore[attr-defined]
        loaded = _momenta(fresh, fresh_client)
        _train(fresh, rank, LRS[2:])
        results[f"ckpt{stage}"] = dict(straight=_full(engine), resumed=_full(fresh), saved=saved, loaded=loaded)
    results["errors"] = _layout_errors(rank)
    torch.save(results, f"{tmp}/rank{rank}.pt")
    deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("zero_lars")
    mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_params(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# -- tests ----------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_lars_equals_full_batch_lars(ranks: list[dict[str, Any]], case: str, kernels: bool) -> None:
    want = _reference()
    start = [p.detach() for p in _model(0).parameters()]
    assert any(float((w - s).abs().max()) > 1e-3 for w, s in zip(want, start))  # the steps moved something
    for result in ranks:  # every rank ends with the same full parameters
        _assert_params(result[f"{case}-kernels{kernels}"], want)


@pytest.mark.distributed
@pytest.mark.slow
def test_the_variants_are_other_layouts(ranks: list[dict[str, Any]]) -> None:
    plain, aligned = ranks[0]["stage1-layout"], ranks[0]["stage1-aligned-layout"]
    assert not any(map(any, plain["gaps"])) and any(map(any, aligned["gaps"]))
    round_robin = ranks[0]["stage2-aligned-round-robin-layout"]
    assert any(order != sorted(order) for order in round_robin["order"]), round_robin
    assert ranks[0]["stage3-layout"]["sub_groups"] == 2 and ranks[0]["stage3-sub-groups-layout"]["sub_groups"] == 3


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_plain_lars_under_zero_is_a_different_optimizer(ranks: list[dict[str, Any]], stage: int) -> None:
    """The same run with fastbyol.step.lars.LARS as the client: its norms are over whole partitions."""
    want = _reference()
    naive = ranks[0][f"naive{stage}"]
    assert max(float((n - w).abs().max()) for n, w in zip(naive, want)) > 1e-4


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", CHECKPOINT_STAGES)
def test_checkpoint_round_trip(ranks: list[dict[str, Any]], stage: int) -> None:
    """Save after two steps, load into an engine built from other weights, step once more: the same
    parameters as not saving, and as the reference; the momentum comes back on every rank. Attach before
    the load (stages 1, 3) or after it (stage 2)."""
    for result in ranks:
        run = result[f"ckpt{stage}"]
        assert any(float(m.abs().max()) > 0 for m in run["saved"])
        for saved, loaded in zip(run["saved"], run["loaded"], strict=True):
            assert torch.equal(saved, loaded)
        for resumed, straight in zip(run["resumed"], run["straight"], strict=True):
            assert torch.equal(resumed, straight)
        _assert_params(run["resumed"], _reference())


@pytest.mark.distributed
@pytest.mark.slow
def test_attach_checks_the_layout(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        errors = result["errors"]
        assert errors["no_attach"].startswith("RuntimeError") and "attach(engine)" in errors["no_attach"]
        for key in ("offsets", "values", "stage3_groups"):
            assert errors[key].startswith("LayoutError") and "DeepSpeed 0.19.8" in errors[key], errors[key]
            assert "\n" not in errors[key]
        assert "sits at flat offset" in errors["offsets"]
        assert "differ" in errors["values"]
        assert "not in client group" in errors["stage3_groups"]


# -- without DeepSpeed ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", [False, True])
def test_without_deepspeed_it_is_lars(kernels: bool) -> None:
    """On the model's own tensors (no attach: stage 0 or no DeepSpeed) ZeroLARS is LARS, bit for bit."""
    model = _model(0)
    optimizer = _zero_lars(lars_param_groups(model.named_modules()), kernels)
    x, y = _batch()
    for lr in LRS:
        optimizer.zero_grad()
        _loss(model(x), y).backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    for got, want in zip(model.parameters(), _reference()):
        assert torch.equal(got, want)


def test_foreign_tensors_need_attach() -> None:
    """What ZeRO does to the groups (one flat tensor per group), without attach: refused, not mis-stepped."""
    model = _model(0)
    optimizer = _zero_lars(lars_param_groups(model.named_modules()), False)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach"):
        optimizer.step()


def test_module_does_not_import_deepspeed() -> None:
    source = (Path(__file__).resolve().parents[1] / "fastbyol" / "step" / "zero_lars.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("deepspeed" in line for line in top_level), top_level
