"""A backbone's blocks: its parameters in groups, input side first, and its forward pass cut between two.

Fine-tuning gives each block a learning rate of its own (``callbacks/finetuning.py``). Partial
fine-tuning trains only the last blocks: those below them, the trunk, stay frozen for the whole
fit, so the trunk's output for an image is the same in every epoch and is cached like a frozen
backbone's features (``features.py``); the top blocks and the head train on it.

:func:`cut_backbone` splits the backbone's forward pass at a block boundary: ``torch.fx`` traces
it, and the nodes before the first one that uses the first top block's parameters are the trunk,
the rest the top. That needs one tensor alone to cross the cut, as at every block boundary of a
ResNet, MobileNet, EfficientNet or ConvNeXt; a network whose later layers reach back past it (a
torchvision ViT's class token and batch size) is refused in one line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn

from caltech_cli.errors import CaltechError


def backbone_blocks(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in blocks, input side first.

    A timm model says its own blocks (``group_matcher``, what timm's layer-wise rate decay uses):
    a ViT's embeddings, then each of its ``blocks`` (the final norm with the last), a ConvNeXt's
    stem, then each block of its ``stages`` (a stage's downsampling with its first block), then its
    head's norm. Otherwise a block is one of the backbone's parts in order, with every plain
    ``nn.Sequential`` opened into its parts: MobileNetV2's ``features`` gives its 19 stages (stem,
    17 inverted residuals, last conv), ResNet's ``layer1``-``layer4`` give their residual blocks
    after ``conv1`` and ``bn1``.
    """
    if callable(getattr(backbone, "group_matcher", None)):
        from timm.models import group_parameters

        named = dict(backbone.named_parameters())
        groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        return [[named[name] for name in groups[key]] for key in sorted(groups)]
    blocks: list[list[nn.Parameter]] = []

    def visit(module: nn.Module) -> None:
        own = list(module.parameters(recurse=False))
        if own:
            blocks.append(own)
        for child in module.children():
            if type(child) is nn.Sequential:
                visit(child)
            elif params := list(child.parameters()):
                blocks.append(params)

    visit(backbone)
    return blocks


@dataclass(frozen=True)
class Cut:
    """A backbone's forward pass in two: ``trunk`` maps images to what the top blocks take,
    ``top`` maps that to the pooled features; both run the backbone's own modules (its
    parameters, not copies). ``depth``: the blocks in the trunk."""

    trunk: fx.GraphModule
    top: fx.GraphModule
    depth: int


def _traced(backbone: nn.Module) -> fx.GraphModule:
    """The backbone's forward pass as a graph of calls to its own modules; a timm model's modules
    and functions that timm marks as not traceable stay whole (as timm's feature extraction does)."""
    leaves: tuple[type, ...] = ()
    functions: tuple = ()
    if type(backbone).__module__.startswith("timm."):
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaves = tuple(get_notrace_modules())
        functions = tuple(f for f in get_notrace_functions() if callable(f))

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, leaves) or super().is_leaf_module(module, name)

    # Options of the forward pass besides the images (a timm ViT's attn_mask) keep their defaults.
    options = list(inspect.signature(backbone.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in options if p.default is not inspect.Parameter.empty}
    return fx.GraphModule(backbone, Tracer(autowrap_functions=functions).trace(backbone, concrete_args=fixed))


def _uses(node: fx.Node, parameters: set[str]) -> bool:
    """Whether ``node`` runs a module holding one of these parameters, or reads one."""
    if node.op == "call_module":
        return any(name.startswith(f"{node.target}.") for name in parameters)
    if node.op == "get_attr":
        return any(name == node.target or name.startswith(f"{node.target}.") for name in parameters)
    return False


def cut_backbone(backbone: nn.Module, depth: int, what: str = "the backbone") -> Cut:
    """Cut ``backbone`` after its first ``depth`` blocks (``backbone_blocks``): the trunk holds
    them, the top the rest. ``what`` names the backbone in messages."""
    blocks = backbone_blocks(backbone)
    if not 0 < depth < len(blocks):
        raise CaltechError(
            f"{what} has {len(blocks)} blocks, so it cannot be cut after {depth}. "
            f"Fix: train between 1 and {len(blocks) - 1} of its last blocks."
        )
    names = {id(p): name for name, p in backbone.named_parameters()}
    first_top = {names[id(p)] for p in blocks[depth]}
    try:
        traced = _traced(backbone)
    except Exception as error:  # symbolic tracing meets data-dependent Python in the forward pass
        raise CaltechError(
            f"{what} ({type(backbone).__name__}) cannot be traced to cut it between blocks "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
            "Fix: fine-tune without the cached trunk (--data.cache_features false) or the whole backbone."
        ) from error
    nodes = list(traced.graph.nodes)
    start = next(i for i, node in enumerate(nodes) if _uses(node, first_top))
    before = set(nodes[:start])
    # What the top takes from the trunk; parameters and buffers it reads are its own to read.
    crossing = {arg for node in nodes[start:] for arg in node.all_input_nodes if arg in before and arg.op != "get_attr"}
    if len(crossing) != 1:
        shown = ", ".join(sorted(node.name for node in crossing))
        raise CaltechError(
            f"{what} ({type(backbone).__name__}) cannot be cut after block {depth}: its later layers take "
            f"{len(crossing)} values from before it ({shown}), not one. "
            "Fix: train another number of its last blocks, or fine-tune without the cached trunk "
            "(--data.cache_features false)."
        )
    boundary = crossing.pop()
    trunk = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in nodes[:start]:
        copied[node] = trunk.node_copy(node, copied.__getitem__)
    trunk.output(copied[boundary])
    top = fx.Graph()
    copied = {boundary: top.placeholder("trunk")}
    for node in nodes[start:]:
        for arg in node.all_input_nodes:
            if arg not in copied:  # a parameter or buffer read first before the cut
                copied[arg] = top.node_copy(arg)
        copied[node] = top.node_copy(node, copied.__getitem__)
    return Cut(_module(traced, trunk), _module(traced, top), depth)


def _module(traced: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` as a module that holds only the backbone's modules it runs."""
    module = fx.GraphModule(traced, graph)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def output_shape(module: nn.Module, crop_size: int) -> tuple[int, ...]:
    """What ``module`` gives for one image of ``crop_size`` pixels, less the batch: one forward
    pass of a blank image in eval mode (no BatchNorm statistics move), every mode restored after."""
    modes = [(part, part.training) for part in module.modules()]
    device = next(module.parameters()).device
    module.eval()
    try:
        with torch.no_grad():
            return tuple(module(torch.zeros(1, 3, crop_size, crop_size, device=device)).shape[1:])
    finally:
        for part, mode in modes:
            part.training = mode
