"""Split backward for any block model: input gradient now (B), weight gradient later (W).

B runs `torch.autograd.grad(out, inp, grad, retain_graph=True)`: the gradient with respect to the
chunk's input, which goes upstream at once. While it runs, a pre-hook on every *weight node*
records the gradient arriving there. A weight node is a node of the graph that leads both to the
input and, through nodes that lead to parameters only, to a parameter: for a Linear it is the
addmm (its gradient is dL/dy, and it saved x, the input W needs), for a LayerNorm its native
layer-norm node. W then runs, per weight node, `torch.autograd.grad(GradientEdge(node, i) ...,
params, recorded gradients)`: only the parameter side of each node, with the tensors it saved,
so no input-gradient work is repeated. This is what torch.distributed.pipelining does
(`stage_backward_input` / `stage_backward_weight`).

What W keeps: the graph is retained by B, so every tensor the chunk saved stays alive until W
ends, also those only B needed (a ReLU's mask); autograd has no public way to free a node's saved
tensors one by one. That is why the pebble graph shows activations alive past B: W's need (the
inputs of the weight nodes) and the rest, released together when W drops the graph.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge


def _walk(root):
    """Every node reachable from `root` (a grad_fn), children before parents in the result."""
    seen, order, stack = set(), [], [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                stack.append((child, False))
    return order


def weight_nodes(out: torch.Tensor, params) -> list:
    """[(node, [params])]: the weight nodes of `out`'s graph and the parameters each reaches
    through parameter-only nodes."""
    pid = {id(p) for p in params}
    reach_in, reach_p = {}, {}
    for node in _walk(out.grad_fn):
        var = getattr(node, "variable", None)              # AccumulateGrad of a leaf
        if var is not None:
            reach_p[node] = [var] if id(var) in pid else []
            reach_in[node] = id(var) not in pid
            continue
        kids = [c for c, _ in node.next_functions if c is not None]
        reach_in[node] = any(reach_in[c] for c in kids)
        reach_p[node] = [p for c in kids for p in reach_p[c]]
    out_nodes = []
    for node in reach_in:
        if not reach_in[node]:
            continue
        ps = [p for c, _ in node.next_functions
              if c is not None and not reach_in[c] for p in reach_p[c]]
        if ps:
            out_nodes.append((node, list({id(p): p for p in ps}.values())))
    return out_nodes


class Split:
    """One chunk-microbatch's backward in two calls: `input_grad` (B) then `weight_grad` (W)."""

    def __init__(self, out, grad, inp, params):
        self.out, self.grad, self.inp = out, grad, inp
        self.nodes = weight_nodes(out, params) if inp is not None else []
        self.seen = {}

    def input_grad(self):
        """B: the gradient of the chunk's input (None for a chunk whose input needs none: it
        leaves everything to W)."""
        if self.inp is None:
            return None
        handles = [node.register_prehook(self._recorder(node)) for node, _ in self.nodes]
        try:
            (g,) = torch.autograd.grad(self.out, self.inp, self.grad, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
        return g

    def _recorder(self, node):
        def hook(grads):
            self.seen[node] = grads
        return hook

    def weight_grad(self):
        """W: accumulate the parameters' gradients into .grad, then let the graph go."""
        if self.inp is None:            # nothing was split off: the whole backward, now
            self.out.backward(self.grad)
        else:
            for node, ps in self.nodes:
                grads = self.seen.get(node)
                if grads is None:
                    continue
                edges = [(GradientEdge(node, i), g) for i, g in enumerate(grads) if g is not None]
                gs = torch.autograd.grad([e for e, _ in edges], ps, [g for _, g in edges],
                                         retain_graph=True, allow_unused=True)
                for p, g in zip(ps, gs):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        self.out = self.grad = self.inp = self.nodes = self.seen = None
