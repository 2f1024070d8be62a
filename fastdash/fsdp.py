"""`parallelism=fsdp`: FSDP2 (`fully_shard`) shards parameters, gradients and AdamW state over ranks.

Each decoder layer is one FSDP unit and the model itself the root unit (embeddings, final norm, the
tied or untied lm_head). Master weights stay fp32 shards; with a bf16 compute dtype FSDP all-gathers
bf16 copies for compute and reduce-scatters gradients in fp32 (`MixedPrecisionPolicy`). Gradients are
summed, not averaged (divide factor 1): every rank's loss is already its share of the global loss
(the step's normaliser is summed over ranks first), as with `distributed.all_reduce_grads` for DDP.

Two things FSDP2 needs that a plain module does not:
- The fused loss reads the lm_head weight outside `forward`. The micro-batch's forward *and* its loss
  therefore run inside one FSDP forward method (`head_forward`, registered with
  `register_fsdp_forward_method`), so the root's parameters are gathered for the loss and their
  gradients reduce-scattered after its backward.
- Every forward all-gathers, so every rank must run the same number of them. Packing gives ranks
  different micro-batch counts (or none, when the filter dropped all of a rank's samples):
  `pad_count` is the most any rank has, and the others run dummy micro-batches whose loss is
  multiplied by zero (their gradients add exactly zero).
Checkpoints gather full state dicts (torch.distributed.checkpoint.state_dict), so an FSDP checkpoint
has the same files as a one-process or DDP one and resumes at any world size or parallelism.
"""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager

import torch
import torch.distributed as dist

from fastdash.distributed import trainer_group
from fastdash.forward import _decoder, forward_hidden

log = logging.getLogger("fastdash")


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, _fsdp().FSDPModule)


def _head_forward(model, mb, fn, body_context):
    """fn(the micro-batch's hidden states, lm_head weight) in one (FSDP) forward; the body runs under
    body_context() (autocast), the loss outside it."""
    with body_context():
        hidden = forward_hidden(model, mb)
    return fn(hidden, model.get_output_embeddings().weight)


def shard(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """fully_shard every decoder layer, then the model (in place; returns it). Build the optimizer after."""
    fsdp = _fsdp()
    mp = fsdp.MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                   reduce_dtype=torch.float32)
    layers = getattr(_decoder(model), "layers", None)
    if layers is None:
        raise ValueError(f"parallelism=fsdp: {type(model).__name__} has no decoder `.layers` to shard; "
                         "use parallelism=ddp")
    mesh = _trainer_mesh(next(model.parameters()).device.type)
    for layer in layers:
        fsdp.fully_shard(layer, mesh=mesh, mp_policy=mp)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=mp)
    for _, m in _units(model):
        m.set_gradient_divide_factor(1.0)  # sum over ranks: the losses were normalised globally
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    model.fastdash_head_forward = types.MethodType(_head_forward, model)
    fsdp.register_fsdp_forward_method(model, "fastdash_head_forward")
    log.info("parallelism=fsdp: fp32 weights, gradients and AdamW state sharded over %d ranks (FSDP2)",
             dist.get_world_size(trainer_group()))
    return model


def _trainer_mesh(device_type: str):
    """The trainer ranks' mesh (None: FSDP's default over the whole world, when every rank trains)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = trainer_group()
    return None if group is None else DeviceMesh.from_group(group, device_type)


def head_forward(model: torch.nn.Module, mb, fn, body_context):
    """fn(hidden [N, H], lm_head weight) for a micro-batch: through FSDP's hooks when sharded."""
    method = getattr(model, "fastdash_head_forward", None)
    return (method or types.MethodType(_head_forward, model))(mb, fn, body_context)


def zero_loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A padding micro-batch's loss: the FSDP forward and backward collectives, a gradient of exactly 0."""
    return (hidden.float().sum() + weight.float().sum()) * 0.0


def pad_count(n: int) -> int:
    """The most forward passes any rank has (each rank must run that many)."""
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=trainer_group())
    return int(t)


def _units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The FSDP units (fully_shard modules) by name, the root ("") first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _fsdp().FSDPModule)]


def _whole(model: torch.nn.Module) -> bool:
    """Every parameter already full: a plain model, or one inside `gathered`."""
    return not is_sharded(model) or getattr(model, "_fastdash_gathered", False)


def reshard_all(model: torch.nn.Module) -> None:
    """Free gathered parameters (the root keeps its own after a no-grad forward)."""
    for _, m in _units(model):
        m.reshard()


@contextmanager
def gathered(model: torch.nn.Module):
    """Full (compute-dtype) parameters in the module while inside (an engine's weight sync; nests)."""
    if _whole(model):
        yield model
        return
    units = [m for _, m in _units(model)]
    for m in units:
        m.unshard()
    model._fastdash_gathered = True
    try:
        yield model
    finally:
        model._fastdash_gathered = False
        for m in units:
            m.reshard()


def full_parameters(model: torch.nn.Module):
    """(name, full compute-dtype tensor) of every parameter, gathering one FSDP unit at a time, so a
    sync never holds a second full copy (a collective: every rank iterates to the end, in this order).
    A plain model, or one inside `gathered`, yields its own parameters."""
    if _whole(model):
        yield from model.named_parameters()
        return
    units = _units(model)
    owned = {n: [] for n, _ in units}  # a parameter belongs to the deepest unit above it
    for name, _ in model.named_parameters():
        owned[max((n for n, _ in units if n == "" or name.startswith(n + ".")), key=len)].append(name)
    for n, unit in units:
        if not owned[n]:
            continue
        unit.unshard()
        try:
            for name in owned[n]:
                yield name, model.get_parameter(name)
        finally:
            unit.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module, rank0_only: bool = True) -> dict:
    """The full fp32 state dict (collective when sharded): on rank 0 only (CPU) or on every rank."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=rank0_only))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state on rank 0 (keyed by parameter name when sharded)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_model_state(model, weights: dict) -> None:
    if not is_sharded(model):
        model.load_state_dict(weights, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a full optimizer state: the one-process format (integer keys, parameter order) or the
    sharded one (parameter names), into a plain or a sharded model's optimizer."""
    by_name = any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not is_sharded(model) and not by_name:
        optimizer.load_state_dict(state)
        return
    if not by_name:  # integer ids are positions in the optimizer's parameter list
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


# ---------------------------------------------------------------- sharded (DCP) checkpoints --------
DCP_DIR = "dcp"  # a checkpoint's sharded weights + optimizer state: torch.distributed.checkpoint files


def _sharded_state(model, optimizer) -> dict:
    """Each rank's own shards (DTensors) under FSDP; plain tensors for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optim}


def save_sharded(model, optimizer, path) -> None:
    """Every trainer rank writes its own shards into `path` (collective; no full copy anywhere)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(path), process_group=trainer_group())


def load_sharded(model, optimizer, path) -> None:
    """Load a DCP checkpoint into a sharded or a plain model, at any world size (DCP re-shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), process_group=trainer_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def sharded_shapes(path) -> dict[str, tuple[int, ...]]:
    """The model tensors a DCP checkpoint holds: {name: full shape} (from its metadata alone)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): tuple(m.size) for k, m in meta.items()
            if k.startswith("model.") and hasattr(m, "size")}
