"""Pebbles: every activation held for backward, with the time it was stored and freed.

`torch.autograd.graph.saved_tensors_hooks(pack, unpack)` calls `pack` each time autograd saves a
tensor for backward. We return a small holder in its place: it is created at save time and
released when autograd frees the saved tensor (after the node's backward, unless the graph is
retained), and its `__del__` timestamps the release (FIELD.md). The holder keeps the tensor
alive exactly as autograd would have, so measuring does not change what is held.

Two traps (FIELD.md): parameters are saved too (the Linear saves weight.t(), a view of the
weight) and are not activations — we skip any tensor whose storage is a parameter's; and one
tensor can be saved several times (a ReLU output is also the next Linear's input) — live
pebbles are keyed by (data pointer, bytes), so the second save adds a reference, not bytes.
"""
from __future__ import annotations

import contextlib

import torch


class Pebble:
    __slots__ = ("key", "step", "mb", "layer", "kind", "bytes", "t_store", "t_free", "refs",
                 "module", "shape", "dtype")

    def __init__(self, key, step, mb, layer, kind, nbytes, t_store, module, shape, dtype):
        self.key, self.step, self.mb, self.layer, self.kind = key, step, mb, layer, kind
        self.bytes, self.t_store, self.t_free, self.refs = nbytes, t_store, None, 0
        self.module, self.shape, self.dtype = module, shape, dtype

    def row(self, t_free="keep"):
        """The pebbles.r<R>.csv row (runformat.PEBBLE_COLS)."""
        return (self.step, self.mb, self.layer, self.kind, self.bytes, self.t_store,
                self.t_free if t_free == "keep" else t_free, self.module, self.shape, self.dtype)


class _Holder:
    """What autograd stores instead of the tensor; freeing it frees (one reference of) the pebble."""
    __slots__ = ("t", "peb", "tracker")

    def __init__(self, t, peb, tracker):
        self.t, self.peb, self.tracker = t, peb, tracker

    def __del__(self):
        self.tracker._unref(self.peb)


class PebbleTracker:
    """Tracks pebbles of one rank. The executor sets `step`, `mb`, `layer` before each forward
    piece, so each save is attributed to the layer that made it.

    `mark` is the rank's timer (trace.clock): on a GPU an event recorded on the current stream
    at save and at release, so a pebble is on the device timeline like the spans (the host runs
    ahead of the device). Marks are resolved to host ns by `resolve_marks` once per step."""

    def __init__(self, mark, params):
        self.now = mark
        self.unresolved: list = []  # pebbles whose t_store or t_free is still a timer mark
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict = {}      # key -> Pebble
        self.freed: list = []     # freed pebbles not yet written
        self.step = self.mb = self.layer = -1
        self.modules: list = []   # names of the modules whose forward is running (innermost last)
        self.live_bytes = 0

    def watch(self, name: str, block: torch.nn.Module) -> None:
        """Attribute what `block`'s sub-modules save to them: forward hooks keep the name of the
        innermost running module (e.g. blocks.3.attn) on a stack while it runs."""
        def leave(mod, args, out):  # returns None: a forward hook's result replaces the output
            self.modules.pop()
        for sub, mod in block.named_modules():
            full = f"{name}.{sub}" if sub else name
            mod.register_forward_pre_hook(lambda m, a, full=full: self.modules.append(full))
            mod.register_forward_hook(leave)

    # -- autograd hooks -------------------------------------------------------------------
    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        if t.untyped_storage().data_ptr() in self.param_storages:
            return t
        # a tensor with a grad_fn may be the saving node's own output (ReLU, log_softmax save
        # their result): holding it as is would close a cycle node -> holder -> tensor -> node
        # that Python's collector cannot see, so a graph that is retained and never run to the
        # end (split backward's B, retain_graph) would never be freed. The detached alias holds
        # the same storage without the edge back; autograd re-attaches what it needs on unpack.
        return _Holder(t.detach() if t.grad_fn is not None else t, self._ref(t, "saved"), self)

    @staticmethod
    def _unpack(h):
        return h.t if type(h) is _Holder else h

    # -- explicit holds: the received boundary tensor, the output kept for backward(grad) ------
    def hold(self, t, kind: str, layer: int, step: int, mb: int, module: str = ""):
        """Count `t` as held until `release` is called with the returned token."""
        return self._ref(t, kind, layer, step, mb, module)

    def release(self, peb) -> None:
        self._unref(peb)

    # -- bookkeeping ------------------------------------------------------------------------
    def _ref(self, t, kind, layer=None, step=None, mb=None, module=None):
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        peb = self.live.get(key)
        if peb is None:
            peb = Pebble(key, self.step if step is None else step, self.mb if mb is None else mb,
                         self.layer if layer is None else layer, kind, nbytes, self.now(),
                         module if module is not None else
                         (self.modules[-1] if self.modules else ""),
                         "x".join(map(str, t.shape)), str(t.dtype).replace("torch.", ""))
            self.unresolved.append(peb)
            self.live[key] = peb
            self.live_bytes += nbytes
        peb.refs += 1
        return peb

    def _unref(self, peb):
        peb.refs -= 1
        if peb.refs == 0:
            peb.t_free = self.now()
            self.unresolved.append(peb)
            if self.live.get(peb.key) is peb:
                del self.live[peb.key]
                self.live_bytes -= peb.bytes
            self.freed.append(peb)

    def resolve_marks(self, resolve) -> None:
        """Turn this step's marks into host ns with the timer's `resolve` (call once per step,
        while the step's anchor holds)."""
        todo, self.unresolved = self.unresolved, []
        pebs = [p for p in dict.fromkeys(todo)]  # a pebble stored and freed in one step: once
        marks = [m for p in pebs for m in (p.t_store, p.t_free)]
        times = resolve([0 if m is None else m for m in marks])
        for i, p in enumerate(pebs):
            p.t_store = times[2 * i]
            p.t_free = None if p.t_free is None else times[2 * i + 1]

    def take_freed(self) -> list:
        """Freed pebbles since the last call (for the trace writer)."""
        out, self.freed = self.freed, []
        return out

    def take_live(self) -> list:
        """Pebbles still held (at the end of the run: never freed)."""
        return list(self.live.values())


class NullTracker:
    """Tracing off: the tracker's calls, nothing recorded (so the executor never asks)."""
    step = mb = layer = -1

    def resolve_marks(self, resolve) -> None:
        pass

    @staticmethod
    def hooks():
        return contextlib.nullcontext()

    def hold(self, *a):
        return None

    def watch(self, name, block) -> None:
        pass

    def release(self, peb) -> None:
        pass
