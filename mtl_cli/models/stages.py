"""Cutting a traced network into stages that run one after the other.

`create_feature_extractor` traces a torchvision model into a torch.fx graph that returns the outputs of the
stage nodes. `split_stages` cuts that graph after each of them: stage k is a GraphModule from stage k-1's output
(the image for stage 0) to its own. That works for every network whose stages form a chain (ResNet, MobileNet,
EfficientNet, ConvNeXt, RegNet, Swin, the blocks of ViT); a stage that reads an earlier stage's output other
than the one before it (a U-Net's skip connection, say) cannot be cut there, and the error names it.
"""

from __future__ import annotations

from torch import fx

from mtl_cli.errors import UserError


def split_stages(traced: fx.GraphModule, name: str) -> list[fx.GraphModule]:
    """One GraphModule per output of `traced` (in order), each taking the previous one's output."""
    nodes = list(traced.graph.nodes)
    (output,) = [n for n in nodes if n.op == "output"]
    returns = list(output.args[0].values()) if isinstance(output.args[0], dict) else list(output.args[0])
    stage_of, k = {}, 0
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        stage_of[node] = k
        while k < len(returns) and node is returns[k]:
            k += 1
    (previous,) = [n for n in nodes if n.op == "placeholder"]
    stages = []
    for k, last in enumerate(returns):
        graph = fx.Graph()
        env = {previous: graph.placeholder("x")}
        for node in nodes:
            if stage_of.get(node) != k:
                continue
            for source in node.all_input_nodes:
                if source in env:
                    continue
                if source.op != "get_attr":
                    raise UserError(f"{name} cannot be cut into stages at {list(map(str, returns))}: stage {k} "
                                    f"reads {source.name}, computed before stage {k - 1}'s output")
                env[source] = graph.node_copy(source)  # a parameter or buffer the stage uses
            env[node] = graph.node_copy(node, lambda n: env[n])
        if last not in env:  # two stage nodes that are one node
            raise UserError(f"{name}: the stages {list(map(str, returns))} must be distinct, in execution order")
        graph.output(env[last])
        stages.append(fx.GraphModule(traced, graph, class_name=f"Stage{k}"))
        previous = last
    return stages
