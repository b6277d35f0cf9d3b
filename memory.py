"""Memory accounting in one place: bytes read per decoded token, what a model, its KV cache and the process
hold, whether a KV cache fits before it is allocated, and the --report_memory tables (one row, or a row per
rank under torchrun)."""
import ctypes
import mmap
import os
import platform
import resource
from pathlib import Path

import torch

from cli import UsageError
from model import KVCache, Transformer

CACHE_BUFFERS = ("kv_cache", "rope_", "causal_mask", "window_mask")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights read per decoded token: every weight (quantized buffers too), counted once, except
    the embedding table, of which a token reads one row, unless it doubles as the output projection. A layer
    that holds its weights in two layouts (quantize.py: one for prompts, one for the decode kernel) says which
    one a decoded token reads (`decode_tensors`); only those count."""
    own = lambda module: [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    layouts = [m for m in model.modules() if hasattr(m, "decode_tensors")]
    held_apart = {id(t) for m in layouts for t in own(m)}
    tensors = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not any(part in name for part in CACHE_BUFFERS) and id(t) not in held_apart}
    tensors.update({id(t): t for m in layouts for t in m.decode_tensors()})
    if getattr(model.output, "weight", None) is not model.tok_embeddings.weight:
        tensors.pop(id(model.tok_embeddings.weight), None)
    return tensor_bytes(tensors.values())


# ---------------------------------------------------------------- where the weights lie


def checkpoint_mappings() -> list:
    """Address ranges of the memory-mapped checkpoint files (*.pth) in this process (Linux; else none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[-1].endswith(".pth"):
            start, end = (int(a, 16) for a in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


MADV_DONTNEED, MADV_HUGEPAGE = 4, 14
HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 0  # every weight: a block's norms lie in the region beside its products


def release_mapped_pages(tensor, mappings: list):
    """Drop the pages of a tensor that lies in one of `mappings` (a checkpoint file) from this process, once
    what it held was copied elsewhere: touched pages of a file mapping count in the resident set for as long as
    the mapping lives. They are clean private pages of the file: dropping them is safe, a later touch re-reads
    them. Tensors outside the mappings (built in memory) are left alone."""
    if tensor is None or tensor.device.type != "cpu" or tensor.is_meta:
        return
    page = mmap.PAGESIZE
    first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    for start, end in mappings:
        if start <= first and last <= end:
            low, high = max(start, first // page * page), min(end, -(-last // page) * page)
            ctypes.CDLL(None).madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED)
            return


def transparent_huge_pages() -> bool:
    """Whether this kernel gives a range marked MADV_HUGEPAGE huge pages (THP "always" or "madvise")."""
    if platform.system() != "Linux" or os.environ.get("GPT_FAST_NO_HUGE_PAGES") == "1":  # (for A/B timings)
        return False
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def place_in_huge_pages(model: torch.nn.Module) -> int:
    """Copy the model's CPU weights into one buffer of transparent huge pages; returns the bytes moved. The
    buffer, as one uint8 tensor, is `model.weight_region`: a decoded token's block finds its weights in it
    (decode_kernels.DecodeBlock.pack_native_weights).

    A decoded token reads every weight once. In 4 KB pages that is a TLB miss per page (SmolLM2 in bfloat16:
    66,000 page walks a token), in 2 MB pages about a hundred: SmolLM2's bfloat16 products, all 151 in turn on
    2 cores of the Zen 4 VM, 6.85 -> 5.8 ms (39 -> 46 GB/s). Tensors that share storage with another one, and
    the KV cache and rope tables (allocated later), stay where they are; pages of the checkpoint mapping that
    were copied are dropped from the process, so the resident set holds the weights once."""
    if not transparent_huge_pages():
        return 0
    model.weight_region, moved = place_together(model, HUGE_PAGE_MIN_BYTES, huge_pages=True)
    return moved


def place_together(root: torch.nn.Module, min_bytes: int = 0, huge_pages: bool = False) -> tuple:
    """(region, bytes moved): the CPU weights under `root` of at least `min_bytes` each (not a KV cache, not
    sharing storage with another) copied into one new buffer, each as a tensor with a storage of its own over
    its part; region is that buffer as one uint8 tensor (None if nothing moved)."""
    places, storages = {}, {}  # id of a tensor -> [(owner, name, is parameter)]; storage -> ids of its tensors
    tensors = {}
    for owner in root.modules():
        if isinstance(owner, KVCache):
            continue
        for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for name, tensor in table.items():
                if (tensor is None or tensor.device.type != "cpu" or tensor.is_meta or not tensor.is_contiguous()
                        or any(part in name for part in CACHE_BUFFERS) or tensor.numel() == 0
                        or tensor.numel() * tensor.element_size() < min_bytes):
                    continue
                tensors[id(tensor)] = tensor
                places.setdefault(id(tensor), []).append((owner, name, is_parameter))
                storages.setdefault(tensor.untyped_storage().data_ptr(), set()).add(id(tensor))
    movable = [key for key, t in tensors.items() if len(storages[t.untyped_storage().data_ptr()]) == 1]
    if not movable:
        return None, 0
    sizes = {key: -(-tensors[key].numel() * tensors[key].element_size() // 64) * 64 for key in movable}
    # An anonymous mapping (page-aligned; its pages not touched yet), marked for huge pages where asked. Each
    # weight gets a storage of its own over its part (torch.frombuffer), as it had: weights that alias one
    # storage are refused by torch.compile's subgraphs.
    total = sum(sizes.values())
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    start = -(-base // HUGE_PAGE) * HUGE_PAGE
    if huge_pages:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(total), MADV_HUGEPAGE)
    mappings, offset, moved = checkpoint_mappings(), start - base, 0
    whole = torch.frombuffer(region, dtype=torch.uint8, count=total, offset=offset)
    for key in movable:
        tensor = tensors.pop(key)
        nbytes = tensor.numel() * tensor.element_size()
        slot = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset).view(tensor.dtype).view(tensor.shape)
        slot.copy_(tensor)
        release_mapped_pages(tensor, mappings)
        # one new object per old one (a weight tied to another, the same Parameter twice, stays tied); the old
        # one is freed as soon as it is replaced, so the copy never holds the model twice
        new = torch.nn.Parameter(slot, requires_grad=tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else slot
        for owner, name, is_parameter in places[key]:
            (owner._parameters if is_parameter else owner._buffers)[name] = new
        offset, moved = offset + sizes[key], moved + nbytes
        del tensor, new
    return whole, moved


def inside(tensor: torch.Tensor, region: torch.Tensor) -> bool:
    """Whether `tensor`'s elements lie in `region`'s memory (contiguous, on the CPU)."""
    first = tensor.data_ptr()
    return (tensor.is_contiguous() and region.data_ptr() <= first
            and first + tensor.numel() * tensor.element_size() <= region.data_ptr() + region.numel())


def layer_weight_bytes(model: Transformer) -> int:
    """Bytes of the transformer blocks' weights (what a tensor-parallel rank or a pipeline stage splits)."""
    tensors = {id(t): t for name, t in [*model.layers.named_parameters(), *model.layers.named_buffers()]
               if "kv_cache" not in name}
    return tensor_bytes(tensors.values())


def cache_bytes(model: Transformer, batch_size: int, max_seq_length: int) -> tuple:
    """What setup_caches will allocate: (K and V of every layer, for this rank's heads; the rope tables and the
    [max_seq_length]^2 boolean masks, which dominate for very long caches)."""
    dtype = model.norm.weight.dtype if model.norm.weight.dtype.is_floating_point else torch.float32
    quantized = model.kv_cache_dtype == torch.int8  # int8 entries and a float32 scale per token and head
    kv = 0
    for layer in model.layers:
        head_dim = layer.attention.head_dim
        per_token_and_head = head_dim + 4 if quantized else head_dim * torch.empty(0, dtype=dtype).element_size()
        kv += 2 * batch_size * layer.attention.n_local_heads * max_seq_length * per_token_and_head
    rope = 2 * max_seq_length * model.args.head_dim * 4
    masks = max_seq_length ** 2 * (2 if model.args.sliding_window else 1)
    return kv, rope + masks


def available_bytes(device) -> int:
    """Memory a new allocation can take now: free GPU memory, or on CPU the kernel's MemAvailable, or less
    where this process's cgroup (a container's memory limit) leaves less."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(available, cgroup_room())


def cgroup_room() -> float:
    """What this process's memory cgroup (v1 or v2) still lets it hold: its limit, less what its processes hold
    other than the page cache (which the kernel reclaims for them); infinite without a limit."""
    room = float("inf")
    try:
        with open("/proc/self/cgroup") as groups:
            lines = [line.rstrip("\n").split(":", 2) for line in groups]
    except OSError:
        return room
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):  # v1: limit_in_bytes, usage_in_bytes, stat's total_cache
            files, cache_key = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_cache"
            folder = f"/sys/fs/cgroup/memory{path}"
        elif controllers == "":  # v2: memory.max ("max": no limit), memory.current, stat's file
            files, cache_key = ("memory.max", "memory.current"), "file"
            folder = f"/sys/fs/cgroup{path}"
        else:
            continue
        try:
            limit, usage = (open(f"{folder}/{name}").read().strip() for name in files)
            stat = dict(line.split() for line in open(f"{folder}/memory.stat"))
            if limit != "max" and int(limit) < 2 ** 60:
                room = min(room, int(limit) - int(usage) + int(stat.get(cache_key, stat.get("cache", 0))))
        except (OSError, ValueError):
            continue
    return room


def check_cache_fits(models: list, batch_size: int, max_seq_length: int, device):
    """Refuse, with both numbers, a KV cache that cannot be allocated, before trying to."""
    kv, masks = (sum(parts) for parts in zip(*(cache_bytes(model, batch_size, max_seq_length) for model in models)))
    free = available_bytes(device)
    if kv + masks > 0.9 * free:
        raise UsageError(f"the KV cache for {max_seq_length} positions (batch {batch_size}) needs {kv / 1e9:,.1f} GB "
                         f"and its attention masks {masks / 1e9:,.1f} GB, but this machine has {free / 1e9:.1f} GB free; "
                         "lower --max_seq_length or --batch_size")


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def memory_figures(model: Transformer, device) -> dict:
    """Parameter count (of the whole model), resident weights, KV cache and peak memory of this process."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Transformer(model.args).parameters())  # logical count, any precision
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    caches = {id(t) for layer in model.layers if layer.attention.kv_cache is not None
              for t in layer.attention.kv_cache.buffers()}
    rope_and_masks = {id(t) for name, t in model.named_buffers() if name.startswith(CACHE_BUFFERS[1:])}
    streamer = getattr(model, "streamer", None)  # streaming.py: what it holds, not the model's logical size
    model_bytes = streamer.held_bytes() if streamer is not None else \
        tensor_bytes(t for i, t in tensors.items() if i not in caches | rope_and_masks)
    return dict(parameters=parameters, cache_bytes=tensor_bytes(tensors[i] for i in caches), model_bytes=model_bytes,
                layer_bytes=layer_weight_bytes(model), peak_bytes=peak_memory_gb(device) * 1e9)


def memory_report(model: Transformer, device) -> str:
    """memory_figures as one markdown table row."""
    f = memory_figures(model, device)
    return ("| parameters | model memory | KV cache memory | peak memory |\n|---:|---:|---:|---:|\n"
            f"| {f['parameters'] / 1e6:.1f} M | {f['model_bytes'] / 1e6:.2f} MB | {f['cache_bytes'] / 1e6:.2f} MB "
            f"| {f['peak_bytes'] / 1e6:.0f} MB |")


def rank_memory_table(rows: list) -> str:
    """One table with a row per rank: each row is a rank's memory_figures plus its "rank" and "holds"."""
    lines = ["| rank | holds | layer weights | model memory | KV cache memory | peak memory |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['holds']} | {r['layer_bytes'] / 1e6:.2f} MB | {r['model_bytes'] / 1e6:.2f} MB "
                     f"| {r['cache_bytes'] / 1e6:.2f} MB | {r['peak_bytes'] / 1e6:.0f} MB |")
    total = {key: sum(r[key] for r in rows) for key in ("layer_bytes", "model_bytes", "cache_bytes", "peak_bytes")}
    lines.append(f"| all | {rows[0]['parameters'] / 1e6:.1f} M parameters | {total['layer_bytes'] / 1e6:.2f} MB "
                 f"| {total['model_bytes'] / 1e6:.2f} MB | {total['cache_bytes'] / 1e6:.2f} MB | {total['peak_bytes'] / 1e6:.0f} MB |")
    return "\n".join(lines)
