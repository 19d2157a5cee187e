"""One code path from 1 to N processes: setup, FSDP2 sharding, reductions, saving and resuming.

`python algos/x.py` runs one process; `torchrun --nproc_per_node N algos/x.py` runs N (nccl on
GPU, gloo on CPU), each decoder layer and then the root sharded with FSDP2 (`fully_shard`).
FSDP2 averages gradients over processes; the scripts scale their loss by the world size so that
the loss is a sum over the global batch divided by its global token (or sequence) count.
"""
import contextlib
import importlib.util
import inspect
import os
import random
import resource
import shutil
import warnings

import torch
import torch.distributed as tdist


def setup(seed):
    """-> (rank, world, device); seeds every RNG identically on every process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed)
    torch.manual_seed(seed)
    return rank, world, device


def rank_world():
    """-> (rank, world) of this process: (0, 1) without torchrun."""
    return (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)


def attn_impl(device):
    """The attention of training forwards. On a GPU: flash-attn's kernels when installed, else PyTorch's own varlen
    FlashAttention (torch >= 2.10, registered as "varlen" by common.packing); sdpa otherwise (CPU, older torch).
    Packed rows stay per document on each: see common.packing.boundaries."""
    from common import packing

    if device.type != "cuda":
        return "sdpa"
    if importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "varlen" if packing.register_varlen() else "sdpa"


def cache_kwarg(model, cache):
    """{name: cache} for a forward or generate call: transformers 5.24 renamed past_key_values to cache."""
    name = "cache" if "cache" in inspect.signature(type(unwrapped(model)).forward).parameters else "past_key_values"
    return {name: cache}


def unwrapped(model):
    """The transformers model inside peft's LoRA wrapper (common.lora), or the model itself."""
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


@contextlib.contextmanager
def gathered(model, budget=None):
    """Sampling with an FSDP2-sharded model: each layer all-gathered once and kept whole for the whole generate call,
    where by default it is gathered again for every new token's forward (the whole model's weights moved per token)
    and freed after. Costs the unsharded weights' memory (bf16 on GPU) while sampling, so it is done only where they
    fit in budget bytes on every process: by default half the GPU memory free now, unlimited on CPU. A model too big
    to hold whole on one GPU keeps FSDP2's per-token gathering. Resharded on exit, the root left unsharded after
    forward, as FSDP2 keeps it. A no-op for a model that is not sharded (one process)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    device = next(model.parameters()).device
    whole = sum(p.numel() for p in model.parameters()) * (2 if device.type == "cuda" else 4)  # shard()'s dtypes
    if budget is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 2
    fits = torch.tensor(budget is None or whole <= budget, device=device, dtype=torch.int32)
    tdist.all_reduce(fits, op=tdist.ReduceOp.MIN)  # one decision on every process, or their all-gathers mismatch
    if not fits.item():
        warnings.warn(f"sampling all-gathers the weights at every token: the whole model ({whole / 2**30:.1f} GiB) "
                      f"does not fit in the budget on every process (by default half the free GPU memory)")
        yield model
        return
    model.set_reshard_after_forward(False)  # every FSDP module of the model
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root, as fully_shard leaves it
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def gradient_checkpointing(model):
    """Recompute every decoder layer's activations in backward instead of keeping them (non-reentrant
    torch.utils.checkpoint). transformers 5.0, the floor, names the switch gradient_checkpointing_enable; later 5.x
    renamed it activation_checkpointing_enable and deprecated the old name: whichever exists is called. A layer
    checkpoints only in train mode, where it also drops the KV cache: generate in eval mode. It sets flags on the
    layers only, so it works before or after shard()."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def decoder_layers(model):
    """The repeated blocks of a transformers model (its _no_split_modules classes): FSDP2's and compile's units."""
    return [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]


def compile_layers(model):
    """torch.compile each decoder layer in place (regional compilation, as torchtitan does): the layers share one
    compiled graph, elementwise work (norms, rotary, activations, residual adds) is fused, and FSDP2's per-layer hooks
    stay outside. Shapes are dynamic, so packed rows of varying document lengths do not recompile."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)
    return model


def shard(model, world, device):
    """FSDP2 per decoder layer, then the root; bf16 compute with fp32 gradient reduction on GPU."""
    model.to(device)
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if unwrapped(model) is not model:  # peft's generate calls its inner model, past the root's all-gather in forward
        register_fsdp_forward_method(model, "generate")
    return model


class Sums:
    """Named running sums of a run's metrics, kept on the model's device and reduced over processes by name.

    The one habit every script shares: `sums.add({"logps/chosen": logps_c.sum(), "pairs": len(m)})` takes tensors
    from any device and Python numbers alike (each is moved to `device`), so a CPU count never meets CUDA values,
    and adding costs no host sync; `sums.reduce()` -> {name: float}, summed over processes. Every process must add
    the same names (the reduction is one all_reduce of the values in name order)."""

    def __init__(self, device):
        self.device, self.values = device, {}

    def add(self, named):
        for name, x in named.items():
            if isinstance(x, torch.Tensor):  # a CPU tensor is copied asynchronously, as every input of the step
                x = x.detach()
                x = (to_device(x, self.device) if x.device.type == "cpu" else x).to(torch.float64)
            else:  # a number is filled in on the device (a blocking copy of it would make the host wait)
                x = torch.full((), x, dtype=torch.float64, device=self.device)
            self.values[name] = self.values[name] + x if name in self.values else x

    def reduce(self):
        names = sorted(self.values)
        if not names:
            return {}
        x = torch.stack([self.values[n] for n in names])
        if tdist.is_initialized():
            tdist.all_reduce(x)
        return dict(zip(names, x.tolist()))


def all_sum(x):
    """Sum of a tensor (or number) over processes, in float64 and on the tensor's device (a number's: the CPU), so
    a sum kept on the GPU is not waited for until the host reads it."""
    x = torch.as_tensor(x, dtype=torch.float64).clone()
    if tdist.is_initialized():
        where = x.device
        x = x.to("cuda") if torch.cuda.is_available() else x  # NCCL reduces CUDA tensors only
        tdist.all_reduce(x)
        x = x.to(where)
    return x


def gather_chunks(mine, world):
    """{chunk index: items} of every process, merged in chunk order into one list on each (a one-process no-op):
    work split over processes by chunk comes back in the order one process would have made it."""
    every = [mine]
    if tdist.is_initialized():
        every = [None] * world
        tdist.all_gather_object(every, mine)
    merged = {c: items for part in every for c, items in part.items()}
    return [item for c in sorted(merged) for item in merged[c]]


def logits_budget(loss_chunk, device):
    """--loss_chunk (millions of vocabulary-wide logits held at once) in logits. -1, the default: 2^27 on GPU, where
    a batch's full logits take gigabytes; 0 on CPU (the model's full logits), the path the embedded task's learning
    tests were calibrated on (its 100-token vocabulary makes the logits small there)."""
    if loss_chunk < 0:
        loss_chunk = 128 if device.type == "cuda" else 0
    return loss_chunk << 20


def clip_grads(model, max_norm):
    """Clips the gradients to max_norm; -> their norm before clipping, a tensor on the device (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def close():
    """The end of a run that went well: the process group shut down while the interpreter is still whole (NCCL
    warns otherwise). Not called after an error, where another process may still wait in a collective that the
    shutdown would hang. gloo's worker threads live on regardless while the model's DTensors hold the group: see
    barrier for what keeps them from touching Python after the interpreter's teardown began."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def to_device(x, device):
    """A CPU tensor to device without stalling the host: pinned and copied asynchronously on CUDA (a copy from
    pageable memory waits for the GPU to finish everything queued before it)."""
    return x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x


def peak_mem_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def save_model(model, tok, output_dir, rank, merge_lora=False):
    """Full Hugging Face model + tokenizer from rank 0; files moved into place, config.json last. A LoRA model
    (common.lora) saves its adapter in output_dir instead, and with merge_lora the merged model in output_dir/merged."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from common import lora

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0 and lora.is_lora(model):
        lora.save_adapter(model, sd, tok, output_dir)
        if merge_lora:
            whole = lora.merged(model, output_dir)
            os.makedirs(os.path.join(output_dir, "merged"), exist_ok=True)
            write_model(whole, whole.state_dict(), tok, os.path.join(output_dir, "merged"))
    elif rank == 0:
        write_model(model, sd, tok, output_dir)
    barrier()  # the others wait until the model is on disk


def write_model(model, sd, tok, output_dir):
    """The state dict sd of model, in transformers' format, with its config and the tokenizer (rank 0)."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for k in getattr(model, "_tied_weights_keys", None) or []:  # a tied copy is not a weight of its own
            sd.pop(k, None)
    tmp = os.path.join(output_dir, ".tmp_model")
    shutil.rmtree(tmp, ignore_errors=True)
    arch = [c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.models")][:1]
    model.save_pretrained(tmp, state_dict=sd)
    model.config.architectures = arch  # the model's class, not FSDP's wrapper class
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for f in sorted(os.listdir(tmp), key=lambda f: f == "config.json"):
        os.replace(os.path.join(tmp, f), os.path.join(output_dir, f))
    os.rmdir(tmp)


def trained_state(model, opt):
    """-> (model, optimizer) state dicts of the parameters that train: all of them, or with LoRA the adapters. Frozen
    weights are the model's own and come back with --model; a tied copy of one (an output embedding tied to the
    input's) is dropped too, which get_state_dict's own filter misses."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in msd.items() if k not in frozen}, osd


def save_checkpoint(path, model, opt, sched, step, rank):
    """Resumable state: sharded model and optimizer (torch.distributed.checkpoint), scheduler,
    step and every RNG. Written to path.tmp and swapped in, so a kill never leaves a broken one."""
    import torch.distributed.checkpoint as dcp

    msd, osd = trained_state(model, opt)
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"sched": sched.state_dict(), "step": step, "rng": rng}, os.path.join(tmp, f"rank{rank}.pt"))
    barrier()
    if rank == 0:
        if os.path.exists(path):
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier()


def load_checkpoint(path, model, opt, sched, rank):
    """-> the step to continue from (0 when there is no checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = path if os.path.exists(path) else path + ".old"  # killed between the two renames
    if not os.path.exists(path):
        return 0
    msd, osd = trained_state(model, opt)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=path)
    # not strict: the frozen weights are absent by design; every trained one was required by dcp.load above
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    extra = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=False)
    sched.load_state_dict(extra["sched"])
    torch.set_rng_state(extra["rng"]["torch"])
    random.setstate(extra["rng"]["python"])
    if extra["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra["step"]


def barrier():
    """Every process waits here for all. On gloo, a point-to-point barrier (monitored_barrier): gloo's own barrier
    keeps handles to the collectives queued before it, and its worker thread frees their tensors after the barrier
    has returned. After the last barrier of a run that free can fall after the interpreter began its teardown, and
    a thread that needs Python then aborts the process ("terminate called without an active exception"): 3 runs in
    120 of a 2-process run on a loaded 2-core CPU."""
    if not tdist.is_initialized():
        return
    if tdist.get_backend() == "gloo":
        tdist.monitored_barrier()
    else:
        tdist.barrier()
