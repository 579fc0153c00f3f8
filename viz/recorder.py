"""One recorded pass: logits, layer activations, taps, and one ``autograd.grad`` for Grad-CAM.

Usage::

    with Recorder(model, layers=["layer1", "layer4"], taps="*") as rec:
        logits = model(x)
    record = rec.finish(target=None)        # one torch.autograd.grad over every recorded layer

Hygiene (analysis.md §6):

- Hooks are registered in ``__enter__`` (an ``ExitStack`` of ``RemovableHandle``) and removed in
  ``__exit__`` even when the forward raises. A recorded layer's hook keeps the module's output and
  hands the rest of the forward ``out.clone()`` (same values; not for outputs that alias the
  input, see below), so the logits are bit-identical with
  and without recording, and an in-place op downstream (``ReLU(inplace=True)``, torchvision's
  ``out += identity`` after a swapped site that absorbed its BN) edits the copy, not the saved
  tensor, which therefore gets a correct gradient. Tap hooks only observe (return ``None``).
- Gradients come from one ``torch.autograd.grad(score, saved_activations)`` call; no module
  backward hooks, no weight gradients. When nothing upstream requires grad (frozen analysis
  copy, plain input), the first recorded activation is made a graph leaf
  (``requires_grad_()``, values untouched), so no graph is built for the stem.
- In-place ops: every saved tensor's version counter is still checked in :meth:`Recorder.finish`.
  An output that shares storage with the module's input (``return x``, a view, an in-place ReLU)
  is handed on uncloned, because the caller may hold and edit that tensor and a copy would change
  the forward; if it is then modified in place it is refused with a message naming the layer,
  unless ``clone=True`` (then its value is a copy taken in the hook and its gradient is ``None``,
  noted in ``Record.notes``).
- Reused modules (torchvision ``Bottleneck.relu`` runs three times per block) are recorded per
  call: keys are ``(name, call_index)``.
- :meth:`Recorder.finish` detaches and moves everything to CPU and drops the graph; a
  ``Recorder`` holds nothing afterwards.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plugconv.base import ConvVariant, Tap

Key = tuple[str, int]


@dataclass(frozen=True)
class TapRecord:
    """One tap firing.

    Attributes:
        name: module path of the tap (e.g. ``"layer1.0.conv2.switch_tap"``).
        call: call index within the forward (0 for taps, which fire once).
        kind: ``Tap.kind`` ("spatial_gate", "mask", "channel_weights", "branch").
        description: ``Tap.description``.
        variant: registry name of the enclosing variant module, or "".
        site: module path of the enclosing variant module (the swapped site), or "".
        local: the tap's name relative to its site (e.g. ``"switch_tap"``).
        value: the tapped tensor, detached, on CPU (shape as fired, e.g. N×1×H×W or N×C).
    """

    name: str
    call: int
    kind: str
    description: str
    variant: str
    site: str
    local: str
    value: torch.Tensor


@dataclass(frozen=True)
class Record:
    """Everything one recorded pass produced (CPU tensors, no graph).

    Attributes:
        logits: N×K pre-softmax scores.
        targets: the class index per image used for the gradients.
        score: what was differentiated: ``"logit"`` (pre-softmax logit of the target class).
        activations: ``{(layer, call): N×C×h×w}`` raw activations at the hook point (the
            module's output).
        gradients: ``{(layer, call): N×C×h×w or None}`` ∂(Σ_n logit[n, target_n])/∂activation.
            Each image's gradient depends only on its own score (eval mode, no cross-batch ops).
        taps: ``{(tap, call): TapRecord}``.
        layers: the requested layer names, in order.
        notes: plain-language caveats (clones, missing gradients).
        erf_layer: the recorded layer whose centre unit seeded ``input_grad`` (None: not asked).
        input_grad: N×3×H×W ∂(Σ_n Σ_c ReLU(F[n, c, h//2, w//2]))/∂x with F = ``erf_layer``'s
            output (``"centre"`` seed; ``"unit"``: Σ_n F[n, 0, h//2, w//2]), taken on the recorded
            graph; None when not asked or not possible (see ``erf_error``).
        erf_feature_hw: (h, w) of F.
        erf_error: why ``input_grad`` is missing although it was asked for, else None.
    """

    logits: torch.Tensor
    targets: tuple[int, ...]
    score: str
    activations: dict[Key, torch.Tensor]
    gradients: dict[Key, torch.Tensor | None]
    taps: dict[Key, TapRecord]
    layers: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    erf_layer: str | None = None
    input_grad: torch.Tensor | None = None
    erf_feature_hw: tuple[int, int] | None = None
    erf_error: str | None = None

    def activation(self, layer: str, call: int = 0) -> torch.Tensor:
        """The activation of ``layer`` at call ``call`` (KeyError names the choices)."""
        try:
            return self.activations[(layer, call)]
        except KeyError:
            raise KeyError(f"no activation recorded for {layer!r} call {call}; recorded: "
                           f"{', '.join(f'{n}[{c}]' for n, c in self.activations)}") from None

    def gradient(self, layer: str, call: int = 0) -> torch.Tensor | None:
        """The gradient for ``layer`` at call ``call`` (None when unavailable)."""
        if (layer, call) not in self.activations:
            self.activation(layer, call)  # raises the KeyError
        return self.gradients.get((layer, call))


def default_output_fn(out: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, the first element of a tuple/list, or ``out["logits"]``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}; pass output_fn")


def find_taps(model: nn.Module, taps: str | Sequence[str] | None = "*") -> dict[str, Tap]:
    """Tap modules of ``model`` whose path matches ``taps`` (fnmatch patterns; None = none)."""
    if taps is None:
        return {}
    pats = [taps] if isinstance(taps, str) else list(taps)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Tap) and any(fnmatch.fnmatchcase(n, p) for p in pats)}


def _enclosing_variant(name: str, modules: dict[str, nn.Module]) -> tuple[str, str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        m = modules.get(path)
        if isinstance(m, ConvVariant):
            return path, getattr(type(m), "name", "") or type(m).__name__
    return "", ""


def _aliases_input(out: torch.Tensor, inp: Any) -> bool:
    """True when ``out`` shares storage with a positional tensor input (``return x``, a view of
    ``x``, ``ReLU(inplace=True)``)."""
    try:
        ptr = out.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. meta, sparse)
        return False
    for t in inp if isinstance(inp, (tuple, list)) else (inp,):
        if isinstance(t, torch.Tensor) and t is not out:
            try:
                if t.untyped_storage().data_ptr() == ptr:
                    return True
            except (RuntimeError, NotImplementedError):
                continue
        elif t is out:
            return True
    return False


class Recorder:
    """Context manager that records one forward (and, in :meth:`finish`, one backward) of a model.

    Args:
        model: the analysis copy (eval mode; in-place activations off).
        layers: module paths whose outputs are recorded and get gradients (N×C×h×w each).
            None: the stage outputs (:func:`viz.models.default_layers`: ResNet ``layer1..4``, timm
            ``blocks.i``) plus every swapped site (each ``ConvVariant`` module).
        taps: fnmatch pattern(s) over ``Tap`` module paths to record (``"*"`` all, None none).
        clone: allow layers whose saved output is still modified in place later (only possible
            when the output aliases a tensor the caller edits, e.g. a module that returns its
            input): their value is copied in the hook and they get no gradient; False (default)
            refuses them in ``finish``. In-place ops on the output itself downstream (``out +=
            identity``, ``ReLU(inplace=True)``) need no option: they run on the clone the hook
            returns.
        output_fn: maps the model output to N×K logits (tuples / dicts; see
            :func:`default_output_fn`).

    Raises:
        KeyError: a layer name that is not a module of ``model`` (message lists stage-like choices).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        taps: str | Sequence[str] | None = "*",
        *,
        clone: bool = False,
        output_fn: Callable[[Any], torch.Tensor] = default_output_fn,
    ) -> None:
        self.model = model
        modules = dict(model.named_modules())
        if layers is None:
            from viz.models import default_layers

            sites = [n for n, m in modules.items() if isinstance(m, ConvVariant) and not _enclosing_variant(n, modules)[0]]
            layers = list(dict.fromkeys([*default_layers(model), *sites]))
        self.layers = tuple(layers)
        missing = [n for n in self.layers if n not in modules]
        if missing:
            top = [n for n, _ in model.named_children()]
            raise KeyError(f"layer(s) {', '.join(map(repr, missing))} not found in the model; "
                           f"top-level modules are: {', '.join(top)}")
        self._modules = modules
        self._tap_modules = find_taps(model, taps)
        self.clone = bool(clone)
        self.output_fn = output_fn
        self._stack: ExitStack | None = None
        self._reset()

    def _reset(self) -> None:
        self._acts: dict[Key, torch.Tensor] = {}
        self._clones: dict[Key, torch.Tensor] = {}
        self._versions: dict[Key, int] = {}
        self._taps: dict[Key, tuple[torch.Tensor, int]] = {}
        self._calls: dict[str, int] = {}
        self._logits: torch.Tensor | None = None

    # -- hooks -----------------------------------------------------------------------------
    def _layer_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(mod: nn.Module, inp: Any, out: Any) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor; "
                                "record a module that returns a tensor")
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = (name, call)
            if torch.is_grad_enabled() and not out.requires_grad and out.is_floating_point():
                # a graph leaf: values untouched; the backward starts here instead of the stem
                out.requires_grad_(True)
            self._acts[key] = out
            self._versions[key] = out._version
            if self.clone:
                self._clones[key] = out.detach().clone()
            if _aliases_input(out, inp):
                # the caller may hold (and edit) this very tensor: handing on a copy would change
                # the forward; leave it, and finish() checks its version counter
                return out
            # a fresh output: the rest of the forward runs on a copy (same values, so the logits
            # are bit-identical); an in-place op downstream (torchvision's `out += identity`
            # after a site that absorbed its BN, ReLU(inplace=True)) edits the copy, never the
            # saved tensor, whose gradient flows back through CloneBackward unchanged
            return out.clone()

        return hook

    def _tap_hook(self, name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return None
            call = self._calls.get("tap:" + name, 0)
            self._calls["tap:" + name] = call + 1
            t = out.detach()
            if self.clone:
                t = t.clone()
            self._taps[(name, call)] = (t, t._version)
            return None

        return hook

    def _root_hook(self, mod: nn.Module, inp: Any, out: Any) -> None:
        self._logits = self.output_fn(out)
        return None

    def __enter__(self) -> Recorder:
        if self._stack is not None:
            raise RuntimeError("this Recorder is already active; use one Recorder per pass")
        self._reset()
        stack = ExitStack()
        try:
            for n in self.layers:
                stack.enter_context(self._modules[n].register_forward_hook(self._layer_hook(n)))
            for n, m in self._tap_modules.items():
                stack.enter_context(m.register_forward_hook(self._tap_hook(n)))
            stack.enter_context(self.model.register_forward_hook(self._root_hook))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        if exc[0] is not None:
            self._reset()  # drop the partial graph

    # -- results ---------------------------------------------------------------------------
    def finish(
        self,
        target: int | Sequence[int] | None = None,
        *,
        gradients: bool = True,
        erf_layer: str | None = None,
        erf_input: torch.Tensor | None = None,
        erf_seed: str = "centre",
    ) -> Record:
        """Take the gradients (one ``torch.autograd.grad``), detach, move to CPU, drop the graph.

        With ``erf_layer``, the effective-receptive-field input gradient is taken first on the
        same graph (``torch.autograd.grad(Σ_c ReLU(F[:, :, h//2, w//2]), erf_input,
        retain_graph=True)``, F = the live output of ``erf_layer``): exactly what
        ``viz.erf.contribution_maps`` computes with its own truncated forward, so the maps are
        bit-identical (for batches of up to its ``batch_size`` images) without a second forward.
        That is two ``autograd.grad`` calls on one graph: one from the ERF seed to the input, one
        from the class score to every recorded layer (they cannot share one call: a joint call
        would return the sum of both gradients).

        Args:
            target: class index for every image, one index per image, or None (each image's
                top-1 class).
            gradients: False skips the Grad-CAM backward (activations and taps only).
            erf_layer: a recorded layer (N×C×h×w output) whose centre unit seeds the ERF
                gradient; None: no ERF gradient.
            erf_input: the N×3×H×W input the forward ran on, with ``requires_grad=True``
                (required with ``erf_layer``).
            erf_seed: ``"centre"`` (RepLKNet, Σ_c ReLU) or ``"unit"`` (Luo, channel 0).

        Returns:
            Record: CPU tensors; gradients of Σ_n logit[n, target_n] (pre-softmax).

        Raises:
            RuntimeError: no forward was recorded, or a recorded activation was modified in place
                after its hook (and ``clone=False``).
            ValueError: a target out of range or of the wrong length; ``erf_input`` missing or
                not requiring grad; unknown ``erf_seed``.
            KeyError: ``erf_layer`` is not a recorded layer.
        """
        if self._stack is not None:
            raise RuntimeError("call finish() after the with-block")
        if self._logits is None:
            raise RuntimeError("no forward pass was recorded; run the model inside the with-block")
        try:
            if erf_layer is not None:
                if erf_input is None or not erf_input.requires_grad:
                    raise ValueError("erf_layer needs erf_input: the input tensor the forward ran on, "
                                     "with requires_grad=True")
                from viz.erf import SEEDS

                if erf_seed not in SEEDS:
                    raise ValueError(f"unknown erf_seed {erf_seed!r}; choose one of {', '.join(SEEDS)}")
                if (erf_layer, 0) not in self._acts:
                    raise KeyError(f"ERF layer {erf_layer!r} was not recorded; recorded layers: "
                                   f"{', '.join(self.layers)}")
            return self._finish(target, gradients, (erf_layer, erf_input, erf_seed))
        finally:
            self._reset()

    def _input_grad(
        self, erf: tuple[str | None, torch.Tensor | None, str], modified: list[Key], retain: bool,
    ) -> tuple[torch.Tensor | None, tuple[int, int] | None, str | None]:
        """The ERF input gradient on the recorded graph: (N×3×H×W CPU tensor, (h, w), error)."""
        from viz.erf import centre_seed

        layer, xi, seed = erf
        if layer is None or xi is None:
            return None, None, None
        key = (layer, 0)
        if key in modified:
            return None, None, (f"{layer} is modified in place later in the forward: its live value is "
                                "not the recorded one; record another ERF layer")
        try:
            s, hw = centre_seed(self._acts[key], layer, seed=seed)
        except ValueError as e:
            return None, None, str(e)
        if not s.requires_grad:
            return None, hw, f"the output of {layer!r} does not depend on the input"
        (g,) = torch.autograd.grad(s, xi, retain_graph=retain, allow_unused=True)
        g = torch.zeros_like(xi) if g is None else g
        return g.detach().cpu(), hw, None

    def _finish(
        self,
        target: int | Sequence[int] | None,
        gradients: bool,
        erf: tuple[str | None, torch.Tensor | None, str] = (None, None, "centre"),
    ) -> Record:
        logits = self._logits
        assert logits is not None
        n, k = logits.shape[0], logits.shape[-1]
        if target is None:
            targets = logits.detach().argmax(-1).reshape(-1).tolist()
        elif isinstance(target, int):
            targets = [int(target)] * n
        else:
            targets = [int(t) for t in target]
            if len(targets) != n:
                raise ValueError(f"{len(targets)} targets given for a batch of {n} images")
        bad = [t for t in targets if not 0 <= t < k]
        if bad:
            raise ValueError(f"target class {bad[0]} out of range [0, {k})")
        notes: list[str] = []
        modified = [key for key, t in self._acts.items() if t._version != self._versions[key]]
        if modified and not self.clone:
            names = ", ".join(f"{n}[{c}]" for n, c in modified)
            raise RuntimeError(
                f"activation of {names} was modified in place after it was recorded: the module "
                "returns its input (or a view of it, e.g. ReLU(inplace=True), Identity) and that "
                "tensor is edited in place later in the forward, so the recorder cannot hand on a copy "
                "without changing the model; record the module that produces the tensor "
                "(prepare_model()'s analysis copy turns in-place ReLUs off), or use Recorder(clone=True) "
                "to keep its value without a gradient")
        for key in modified:
            notes.append(f"{key[0]}[{key[1]}] is modified in place later in the forward (aliased output): "
                         "value copied in the hook, no gradient")
        grads: dict[Key, torch.Tensor | None] = {key: None for key in self._acts}
        keys = [key for key, t in self._acts.items() if key not in modified and t.requires_grad] if gradients else []
        # ERF first, keeping the graph for the Grad-CAM call that follows
        input_grad, erf_hw, erf_error = self._input_grad(erf, modified, retain=bool(keys))
        if gradients:
            if keys:
                idx = torch.tensor(targets, device=logits.device).reshape(-1, 1)
                score = logits.reshape(n, k).gather(1, idx).sum()
                if not score.requires_grad:
                    raise RuntimeError("the logits do not depend on the recorded layers with grad enabled; "
                                       "run the forward outside torch.no_grad()/inference_mode()")
                got = torch.autograd.grad(score, [self._acts[key] for key in keys], allow_unused=True)
                for key, g in zip(keys, got):
                    grads[key] = None if g is None else g.detach().cpu()
            missing = [key for key in self._acts if grads[key] is None and key not in modified]
            for key in missing:
                notes.append(f"{key[0]}[{key[1]}]: no gradient (the score does not depend on it)")
        acts = {key: (self._clones[key] if key in modified else t.detach()).cpu() for key, t in self._acts.items()}
        taps: dict[Key, TapRecord] = {}
        for (name, call), (t, version) in self._taps.items():
            if t._version != version and not self.clone:
                raise RuntimeError(f"tap {name!r} was modified in place after it fired; use Recorder(clone=True)")
            site, variant = _enclosing_variant(name, self._modules)
            mod = self._tap_modules[name]
            local = name[len(site) + 1:] if site else name
            taps[(name, call)] = TapRecord(name, call, mod.kind, mod.description, variant, site, local, t.cpu())
        return Record(
            logits=logits.detach().cpu(),
            targets=tuple(int(t) for t in targets),
            score="logit",
            activations=acts,
            gradients=grads,
            taps=taps,
            layers=self.layers,
            notes=tuple(notes),
            erf_layer=erf[0],
            input_grad=input_grad,
            erf_feature_hw=erf_hw,
            erf_error=erf_error,
        )
