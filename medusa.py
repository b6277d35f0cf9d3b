"""Medusa heads (Cai et al. 2024, FasterDecoding/Medusa): extra next-next-token predictors on the final
hidden state, and the candidate trees they are verified with.

Head k (0-based) guesses the token k + 2 places ahead: x -> [x + SiLU(W x + b)] * num_layers -> vocab
projection. A tree of candidates (each node a path of top-k ranks, one rank per head) is checked by the
target in one forward with a tree attention mask; the longest path the target agrees with is kept.
The decode loop lives in generate.py; this file holds the heads, their file format and the tree buffers.
"""
import ast
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from checkpoint import CheckpointError, atomic_output
from model import ModelArgs

HEAD_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")

# Trees: each node is the path of top-k ranks from the root (the base model's token) to it.
# Small trees for CPUs, where every node costs a token of compute; mc_sim_7b_63 is Medusa's default GPU tree.
NAMED_TREES = {
    "chain1": [(0,)],
    "chain2": [(0,), (0, 0)],
    "chain3": [(0,), (0, 0), (0, 0, 0)],
    "tree4": [(0,), (1,), (0, 0), (0, 0, 0)],
    "tree8": [(0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)],
    "mc_sim_7b_63": [
        (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
        (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
        (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
        (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
        (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
        (0, 0, 0, 1), (1, 6), (0, 7, 0),
    ],
}


# ---------------------------------------------------------------- heads


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """A ModuleList so that parameter names are exactly the published `{head}.{layer}.linear.weight` layout."""

    def __init__(self, dim: int, vocab_size: int, num_heads: int, num_layers: int = 1):
        super().__init__(nn.Sequential(*[ResBlock(dim) for _ in range(num_layers)], nn.Linear(dim, vocab_size, bias=False))
                         for _ in range(num_heads))
        self.num_layers = num_layers
        self.shared_output = None  # (model.output,) once share_output is called

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., dim] -> logits [..., num_heads, vocab]."""
        logits_or_blocks = torch.stack([head(hidden) for head in self], dim=-2)
        if self.shared_output is None:
            return logits_or_blocks
        return self.shared_output[0](logits_or_blocks)  # one read of the projection for every head

    def share_output(self, output: nn.Module):
        """Use the model's own output projection (float or quantized) for every head: for heads trained with
        their projection frozen at a copy of it, the same numbers with one weight read per step, not one per
        head. Kept in a tuple so that the model's weights do not become the heads' parameters."""
        for head in self:
            head[-1] = nn.Identity()
        self.shared_output = (output,)

    @classmethod
    def fresh(cls, output: nn.Linear, num_heads: int, num_layers: int = 1) -> "MedusaHeads":
        """Heads that start as the base model's own next-token predictor: identity blocks (zero weights)
        and a copy of its output projection, as Medusa initialises them."""
        vocab_size, dim = output.weight.shape
        heads = cls(dim, vocab_size, num_heads, num_layers)
        with torch.no_grad():
            for head in heads:
                for block in head[:-1]:
                    block.linear.weight.zero_()
                    block.linear.bias.zero_()
                head[-1].weight.copy_(output.weight)
        return heads


def write_medusa_heads(heads: dict, num_heads: int, num_layers: int, directory: Path, base_model: str,
                       shared_projection: bool = False) -> Path:
    """Medusa heads in FasterDecoding's layout: medusa_lm_head.safetensors + config.json. `shared_projection`
    (our key; other loaders ignore it) records that every head's projection is still the base model's own."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "medusa_lm_head.safetensors"
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp))
    with atomic_output(directory / "config.json") as tmp:
        tmp.write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
                                   "base_model_name_or_path": base_model, "shared_projection": shared_projection},
                                  indent=2) + "\n")
    return path


def save_medusa_heads(heads: MedusaHeads, directory: Path, base_model: str = "", shared_projection: bool = False) -> Path:
    return write_medusa_heads(heads.state_dict(), len(heads), heads.num_layers, Path(directory), base_model,
                              shared_projection)


def load_medusa_heads(path: Path, args: ModelArgs, output: nn.Module = None) -> MedusaHeads:
    """Heads from a FasterDecoding folder (or its head file), checked against the base model's shape.
    Given the model's `output` module, heads whose config says their projections are the base model's
    share it (see MedusaHeads.share_output)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    files = [directory / name for name in HEAD_FILES if (directory / name).is_file()] if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise CheckpointError(f"no Medusa head file ({' or '.join(HEAD_FILES)}) at {path}; "
                              "train heads with scripts/train_medusa.py or download a FasterDecoding head folder")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(files[0]))
    else:
        state_dict = torch.load(files[0], map_location="cpu", weights_only=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    num_heads = config.get("medusa_num_heads") or 1 + max(int(k.split(".")[0]) for k in state_dict)
    num_layers = config.get("medusa_num_layers", 1)
    with torch.device("meta"):
        heads = MedusaHeads(args.dim, args.vocab_size, num_heads, num_layers)
    expected = heads.state_dict()
    if set(state_dict) != set(expected):
        missing = sorted(set(expected) - set(state_dict)) or sorted(set(state_dict) - set(expected))
        raise CheckpointError(f"{files[0]} does not hold {num_heads} heads of {num_layers} layer(s) "
                              f"in the Medusa layout (e.g. {missing[0]!r})")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            projection = name.endswith(f".{num_layers}.weight")
            what = "vocabulary size" if projection and tensor.shape[0] != args.vocab_size else "hidden size"
            raise CheckpointError(f"Medusa heads in {files[0]} do not fit this model ({what}): {name} is "
                                  f"{tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)}; "
                                  "use heads trained for this base model")
    heads.load_state_dict(state_dict, assign=True)
    if output is not None and config.get("shared_projection"):
        heads.share_output(output)
    return heads


# ---------------------------------------------------------------- trees


@dataclass
class MedusaTree:
    """Buffers for one tree of `size` nodes (node 0 is the root: the base model's own next token).

    token_indices: for each node, where its token is in [root, head 0's top-k, head 1's top-k, ...]
    depths:        each node's distance from the root: positions are input_pos + depth
    attention:     [size, size] bool, node i sees node j when j is i or one of its ancestors
    paths:         [leaves, max_depth + 1] node indices from the root to each leaf, -1 past the leaf
    """
    choices: list
    topk: int
    token_indices: Tensor
    depths: Tensor
    attention: Tensor
    paths: Tensor

    @property
    def size(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        return self.paths.shape[1] - 1

    def to(self, device) -> "MedusaTree":
        return MedusaTree(self.choices, self.topk, *(t.to(device) for t in
                                                     (self.token_indices, self.depths, self.attention, self.paths)))


def build_tree(choices) -> MedusaTree:
    choices = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))  # parents before children
    if not choices or any(len(c) == 0 or min(c) < 0 for c in choices):
        raise ValueError("a Medusa tree is a list of non-empty paths of top-k ranks, e.g. [(0,), (1,), (0, 0)]")
    node = {c: i + 1 for i, c in enumerate(choices)}
    for c in choices:
        if len(c) > 1 and c[:-1] not in node:
            raise ValueError(f"tree node {c} has no parent {c[:-1]} in the tree")
    topk = max(max(c) for c in choices) + 1
    size = len(choices) + 1
    token_indices, depths = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.long)
    attention = torch.eye(size, dtype=torch.bool)
    attention[:, 0] = True
    for c in choices:
        i = node[c]
        token_indices[i] = 1 + (len(c) - 1) * topk + c[-1]  # rank c[-1] of head len(c) - 1
        depths[i] = len(c)
        for cut in range(1, len(c)):
            attention[i, node[c[:cut]]] = True
    leaves = [c for c in choices if not any(len(d) == len(c) + 1 and d[:-1] == c for d in choices)]
    max_depth = max(len(c) for c in choices)
    paths = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        paths[row, : len(leaf) + 1] = torch.tensor([0] + [node[leaf[:cut]] for cut in range(1, len(leaf) + 1)])
    return MedusaTree(choices, topk, token_indices, depths, attention, paths)


def parse_tree(spec: str) -> MedusaTree:
    """A name from NAMED_TREES, or a file holding a list of paths (JSON or a Python literal)."""
    if spec in NAMED_TREES:
        return build_tree(NAMED_TREES[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--medusa_choices {spec!r} is neither a tree name ({', '.join(NAMED_TREES)}) nor a file")
    try:
        return build_tree(ast.literal_eval(path.read_text().strip()))
    except (SyntaxError, TypeError, ValueError) as error:
        raise ValueError(f"{path} does not hold a Medusa tree ({error}); write a list of paths like [[0], [1], [0, 0]]")


def tree_attention_mask(tree: MedusaTree, input_pos: int, max_seq_length: int) -> Tensor:
    """[1, 1, size, max_seq_length]: every node sees the cached prefix (slots < input_pos) and, among the
    tree's own slots (input_pos + node index), itself and its ancestors."""
    relative = torch.arange(max_seq_length, device=tree.attention.device) - input_pos
    in_tree = (relative >= 0) & (relative < tree.size)
    mask = (relative < 0)[None, :] | (tree.attention[:, relative.clamp(0, tree.size - 1)] & in_tree[None, :])
    return mask[None, None]
