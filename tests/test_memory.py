"""memory.place_in_huge_pages: load_model's weights (CPU) moved into a mapping marked for transparent huge pages,
each weight with a storage of its own, tied weights still one object, the model's output unchanged."""
import pytest
import torch

import generate
import memory


def mapping_of(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
                fields = {"range": (start, end)} if inside else fields
            elif inside:
                fields[head.rstrip(":")] = line.split()[1:]
            if fields and not inside and "range" in fields:
                break
    return fields


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the checkpoint's own dtype (mapped), and a copy
def test_weights_move_to_huge_pages_and_compute_alike(dtype, tiny_models, monkeypatch):
    if not memory.transparent_huge_pages():
        pytest.skip("this kernel has transparent huge pages off")
    _, _, checkpoint = tiny_models["llama"]
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 4096)  # the tiny model's weights are 12-64 KB
    monkeypatch.setenv("GPT_FAST_NO_HUGE_PAGES", "1")
    plain = generate.load_model(checkpoint, "cpu", dtype)
    monkeypatch.delenv("GPT_FAST_NO_HUGE_PAGES")
    placed = generate.load_model(checkpoint, "cpu", dtype)
    large = [(name, p) for name, p in placed.named_parameters(remove_duplicate=False)
             if p.numel() * p.element_size() >= memory.HUGE_PAGE_MIN_BYTES]
    assert large, "the tiny model has weights of 64 KB or more"
    for name, weight in large:
        region = mapping_of(weight.data_ptr())
        assert "hg" in region.get("VmFlags", []), (name, region)  # marked MADV_HUGEPAGE (malloc'd memory is not)
    storages = [p.untyped_storage().data_ptr() for p in placed.parameters()]
    assert len(storages) == len(set(storages))  # no two weights alias one storage (torch.compile's subgraphs)
    assert placed.output.weight is placed.tok_embeddings.weight  # tied stays tied
    tokens = torch.arange(12)[None]
    for model in (plain, placed):
        model.setup_caches(1, 12)
    with torch.no_grad():
        assert torch.equal(placed(tokens, torch.arange(12)), plain(tokens, torch.arange(12)))
