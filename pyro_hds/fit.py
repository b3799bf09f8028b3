"""Training: :func:`fit` runs stochastic variational inference over minibatches of individuals.

The loop is plain PyTorch over the parameters that the model and guide register in Pyro's
parameter store: Adam with a learning-rate schedule, gradient-norm clipping, minibatches of
individuals drawn without replacement each epoch, an optional validation set whose held-out
bound is logged, a tqdm progress bar, optional TensorBoard scalars, and checkpoints written
atomically (temporary file, then ``os.replace``) from which a fit resumes exactly.

Checkpoints hold tensors, numbers and strings only and are read with
``torch.load(weights_only=True)``: loading a checkpoint never executes pickled code.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.util import is_validation_enabled

from pyro_hds.objectives import IWAE, NonFiniteLossError

__all__ = ["NonFiniteLossError", "fit"]

#: 2: Adam's state as written by :class:`_Adam` (1, read too: ``torch.optim.Adam``'s state dict)
CHECKPOINT_FORMAT = 2


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _SettledObjects:
    """Keeps Python's cyclic garbage collector off the objects that outlive the first steps.

    ``torch.compile``, Pyro, the guide and the caller's session hold hundreds of thousands of
    long-lived objects, and every full (generation 2) collection walks all of them: about
    150 ms each in the vi-hds fit (a tenth of an epoch at K = 100), although none of them is
    garbage. Once the fit has settled (compiled kernels built, parameters created),
    :meth:`settle` collects once and moves the survivors to the permanent generation
    (``gc.freeze``); objects made by later steps are collected as usual. :meth:`release`
    returns them at the end. Nothing is done when the caller has frozen objects already."""

    def __init__(self) -> None:
        self.frozen = False

    def settle(self) -> None:
        if self.frozen or gc.get_freeze_count() > 0:
            return
        gc.collect()
        gc.freeze()
        self.frozen = True

    def release(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


class _Adam:
    r"""Adam (Kingma and Ba, 2015) over a fixed list of tensors, with the learning rate given
    to each :meth:`step` (the schedule lives in :func:`fit`).

    For a tensor :math:`\theta` with gradient :math:`g` at its :math:`t`-th step (counted per
    tensor, from its first gradient):

    .. math::

        m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
        \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}.

    The operations are those of ``torch.optim.Adam``'s single-tensor path in the same order,
    so on the CPU the iterates are bit-for-bit the same as with ``torch.optim.Adam`` and
    ``LambdaLR``; tensors without a gradient are left alone and their step count waits, as
    there. It exists because every ``torch.optim`` optimizer imports ``torch._dynamo`` when
    it is built (its ``add_param_group`` is wrapped to keep dynamo out), about 1.1 s on a
    2-core machine, a third of a short fit's wall time."""

    def __init__(
        self,
        params: list[torch.Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.betas = betas
        self.eps = eps
        self.steps = [0] * len(params)
        self.exp_avg: list[torch.Tensor | None] = [None] * len(params)
        self.exp_avg_sq: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            m, v = self.exp_avg[i], self.exp_avg_sq[i]
            if m is None or v is None:
                m = self.exp_avg[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = self.exp_avg_sq[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.steps[i] += 1
            t = self.steps[i]
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**t)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, integers and ``None`` only (loadable with ``weights_only=True``)."""
        return {"steps": list(self.steps), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["steps"]) != len(self.params):
            raise ValueError(
                f"checkpoint holds Adam state for {len(state['steps'])} parameters, this model "
                f"and guide have {len(self.params)}; resume with the same model and guide."
            )
        self.steps = [int(t) for t in state["steps"]]
        self.exp_avg = [
            None if m is None else m.to(p) for m, p in zip(state["exp_avg"], self.params)
        ]
        self.exp_avg_sq = [
            None if v is None else v.to(p) for v, p in zip(state["exp_avg_sq"], self.params)
        ]

    def load_torch_state_dict(self, state: dict[str, Any]) -> None:
        """Read the state dict of a ``torch.optim.Adam`` over the same parameters (checkpoint
        format 1, written before :func:`fit` had its own Adam)."""
        entries = [state["state"].get(i, {}) for i in range(len(self.params))]
        self.load_state_dict(
            {
                "steps": [int(e.get("step", 0)) for e in entries],
                "exp_avg": [e.get("exp_avg") for e in entries],
                "exp_avg_sq": [e.get("exp_avg_sq") for e in entries],
            }
        )


def _param_state() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def _load_param_state(params: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    missing = [name for name in params if name not in store.keys()]
    if missing:
        raise ValueError(
            f"checkpoint holds parameters {missing} that this model and guide do not create; "
            "resume with the same model, guide and options that wrote the checkpoint."
        )
    with torch.no_grad():
        for name, value in params.items():
            target = store._params[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, this guide's "
                    f"has {tuple(target.shape)}; resume with the same guide options."
                )
            target.copy_(value.to(target))


def _lr_factor(
    schedule: str | Callable[[int, int], float],
    step: int,
    num_steps: int,
    final: float,
    warmup: int,
) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if callable(schedule):
        factor = float(schedule(step, num_steps))
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(
                f"fit(lr_schedule=...): the schedule returned {factor} at step {step}; it must "
                "return a positive, finite factor of lr"
            )
        return factor
    if schedule == "constant":
        return 1.0
    frac = min(1.0, step / max(1, num_steps - 1))
    if schedule == "exponential":
        return final**frac
    if schedule == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(
        f"fit(lr_schedule={schedule!r}): choose 'constant', 'exponential' or 'cosine', or "
        "pass a callable (step, num_steps) -> factor."
    )


def fit(
    model: Callable,
    data: Any,
    *,
    guide: Any = None,
    objective: Any = None,
    num_steps: int = 1000,
    batch_size: int | None = None,
    lr: float = 1e-2,
    lr_schedule: str | Callable[[int, int], float] = "exponential",
    final_lr_fraction: float = 0.1,
    warmup_steps: int = 0,
    clip_norm: float | None = 10.0,
    average_last: float = 0.0,
    validation: Any = None,
    validate_every: int = 100,
    validation_particles: int = 100,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: str | os.PathLike | bool | None = None,
    seed: int | None = 0,
    progress: bool = True,
    tensorboard: str | os.PathLike | None = None,
    callback: Callable[[int, float], None] | None = None,
    check_every_step: bool = False,
):
    r"""Fit ``guide`` to ``model`` on ``data`` and return a :class:`~pyro_hds.FitResult`.

    :param model: ``model(data)``, a Pyro model over a :class:`~pyro_hds.Dataset` minibatch.
    :param data: the training :class:`~pyro_hds.Dataset` (N individuals). Any other object
        (e.g. a dict of tensors for a model without an individuals plate) is passed to the
        model whole at every step.
    :param guide: defaults to ``AmortizedGuide(model)``. A guide that has not run yet starts
        from an empty Pyro parameter store (parameters that earlier code put there, e.g. by
        another fit, are cleared; earlier :class:`~pyro_hds.FitResult` objects keep theirs);
        a guide that has already been trained continues from its parameters.
    :param objective: defaults to ``IWAE(num_particles=10)``; any Pyro ELBO works too
        (``Trace_ELBO(vectorize_particles=True, num_particles=..., max_plate_nesting=1)``).
    :param num_steps: optimisation steps (one minibatch each).
    :param batch_size: individuals per step, ``B``; all of them if None. Each epoch visits every
        individual once, in a random order; the individuals plate scales the minibatch by N/B.
    :param lr: Adam's learning rate; ``lr_schedule`` (``exponential``, ``cosine`` or
        ``constant``) decays it to ``final_lr_fraction * lr`` at the last step, after
        ``warmup_steps`` of linear warm-up. A callable ``lr_schedule(step, num_steps)``
        returns the factor of ``lr`` for each step instead, e.g. a multi-step decay
        ``lambda s, n: 0.2 ** (s >= 1750)`` (0-based steps).
    :param clip_norm: clip the global gradient norm (None: no clipping).
    :param average_last: the share of the steps over which the parameters are averaged
        (Polyak-Ruppert tail averaging; 0: off). With :math:`T` steps and
        :math:`M = \max(1, \operatorname{round}(\text{average\_last} \cdot T))`, the fit returns

        .. math:: \bar\theta = \frac{1}{M} \sum_{t = T - M + 1}^{T} \theta_t,

        the mean of the parameters after each of the last :math:`M` optimizer steps, in place
        of the last iterate :math:`\theta_T`. Near the optimum, Adam's iterates wander around
        it with a spread set by the learning rate and the gradient noise (minibatches,
        particles); their mean has a smaller spread, at the price of a lag if the parameters
        still drift (then fit longer). The averages are kept in the checkpoint, so a resumed fit
        returns the same mean; an interrupted fit leaves the last iterate in the store.
    :param validation: a held-out :class:`~pyro_hds.Dataset`; every ``validate_every`` steps its
        per-individual importance-weighted bound with ``validation_particles`` is logged.
    :param checkpoint: a file written atomically every ``checkpoint_every`` steps and at the end.
    :param resume: a checkpoint to continue from (``True``: the ``checkpoint`` file, if present).
        Continuing reproduces the uninterrupted fit on CPU.
    :param seed: seeds Pyro's and torch's generators (None: leave them alone). Networks built
        before the call (an encoder passed to a guide) took their initial weights from the
        generator's state at construction: seed before building them for a reproducible fit.
    :param progress: show a tqdm progress bar.
    :param tensorboard: a log directory for TensorBoard scalars (needs ``tensorboard``).
    :param callback: ``callback(step, loss)`` after every step.
    :param check_every_step: keep Pyro's and torch's argument and support checks (Pyro's
        validation) on in every step. By default, when validation is enabled, the fit checks
        the whole training set once before its first step (one guide draw and the model on
        every individual, so every observation meets its site's support; the random
        generators are left as they were) and the first step, then trains with the checks off:
        they re-check at every step what cannot change (the observations) or what the guide
        guarantees (latent values in their supports), and took about 6% of a step of the
        double-receiver model. A parameter that leaves its domain later in training still
        stops the fit, as a non-finite loss (:class:`NonFiniteLossError` names the sites).

    :raises NonFiniteLossError: when the objective or a gradient is not finite; the message
        names the sites, individuals or parameters.

    While it runs, the Python objects alive after the first step are kept out of the cyclic
    garbage collector's full collections (``gc.freeze``; ``gc.unfreeze`` when the fit returns
    or fails), unless the caller has frozen objects already: the long-lived objects of
    ``torch.compile`` and Pyro otherwise cost 100-200 ms per full collection.
    """
    from pyro_hds.results import FitResult

    if num_steps < 0 or int(num_steps) != num_steps:
        raise ValueError(f"fit(num_steps={num_steps!r}): must be a non-negative int")
    minibatching = _is_dataset(data)
    if minibatching:
        n = len(data)
        if n == 0:
            raise ValueError("fit(): the data set has no individuals")
        # a subset (e.g. the training folds data[train]) is the whole training set here:
        # minibatches must be scaled by its own size, not by the size it was cut from
        data = data.standalone()
    elif batch_size is not None:
        raise ValueError(
            "fit(batch_size=...): minibatches need a pyro_hds.Dataset; other data are passed "
            "to the model whole at every step"
        )
    else:
        n = 1
    batch = n if batch_size is None else int(batch_size)
    if not 1 <= batch <= n:
        raise ValueError(f"fit(batch_size={batch_size!r}): must be between 1 and N = {n}")
    if validate_every < 1 or checkpoint_every < 1:
        raise ValueError("fit(): validate_every and checkpoint_every must be >= 1")
    if not 0.0 <= average_last <= 1.0:
        raise ValueError(f"fit(average_last={average_last}): must be in [0, 1]")
    if not 0 < final_lr_fraction <= 1:
        raise ValueError(f"fit(final_lr_fraction={final_lr_fraction}): must be in (0, 1]")
    _lr_factor(lr_schedule, 0, max(num_steps, 1), final_lr_fraction, 0)  # validates it

    if seed is not None:
        pyro.set_rng_seed(seed)
    if guide is None:
        from pyro_hds.guides import AmortizedGuide

        guide = AmortizedGuide(model)
    if getattr(guide, "prototype_trace", False) is None:
        # a guide that has never run: start from an empty parameter store, so that the
        # parameters of an earlier fit (same site names) do not leak in as a silent warm start
        # (earlier FitResults keep their own parameters)
        pyro.clear_param_store()
    if objective is None:
        objective = IWAE(num_particles=10)
    if not hasattr(objective, "differentiable_loss"):
        raise TypeError("fit(objective=...): expected a Pyro ELBO or pyro_hds.IWAE")

    perm_gen = torch.Generator()
    perm_gen.manual_seed(0 if seed is None else seed)

    attach = getattr(guide, "attach_training_data", None)
    if callable(attach) and _is_dataset(data):
        attach(data)  # a semi-amortized guide keeps one correction per training individual
    # a guide may train different parameters in different phases of the fit
    training_phase = getattr(guide, "training_phase", None)
    training_phase = training_phase if callable(training_phase) else None
    # create every parameter (model and guide) with one pass on a minibatch
    first = data[torch.arange(batch)] if minibatching else data
    objective.differentiable_loss(model, guide, first)
    store = pyro.get_param_store()
    names, params, seen = [], [], set()
    for name in store.keys():  # one entry per tensor (modules may be registered twice)
        p = store._params[name]
        if id(p) not in seen:
            seen.add(id(p))
            names.append(name)
            params.append(p)
    if not params:
        raise ValueError("fit(): the model and guide have no parameters to optimise")
    for p in params:
        p.requires_grad_(True)
    optimizer = _Adam(params)

    def lr_at(step: int) -> float:
        return lr * _lr_factor(lr_schedule, step, num_steps, final_lr_fraction, warmup_steps)

    history: dict[str, list] = {"step": [], "loss": [], "val_step": [], "val_bound": []}
    # tail averaging: the running mean of each parameter over the steps from first_averaged on
    first_averaged = (
        num_steps - max(1, round(average_last * num_steps)) if average_last else num_steps
    )
    averages: list[torch.Tensor] = []
    averaged_steps = 0
    start = 0
    order = torch.randperm(n, generator=perm_gen)
    cursor = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume is True:
        resume = ckpt_path if ckpt_path is not None and ckpt_path.exists() else None
    if resume:
        state = torch.load(Path(resume), map_location="cpu", weights_only=True)
        if state.get("format") not in (1, CHECKPOINT_FORMAT):
            raise ValueError(f"{resume}: not a pyro_hds checkpoint (format {state.get('format')})")
        if state["names"] != names:
            raise ValueError(
                f"{resume}: the checkpoint's parameters {state['names']} differ from this "
                f"model and guide's {names}; resume with the same model, guide and options."
            )
        _load_param_state(state["params"])
        if state["format"] == 1:
            optimizer.load_torch_state_dict(state["optimizer"])
        else:
            optimizer.load_state_dict(state["adam"])
        torch.set_rng_state(state["torch_rng"])
        perm_gen.set_state(state["perm_rng"])
        order, cursor, start = state["order"], int(state["cursor"]), int(state["step"])
        history = {k: list(v) for k, v in state["history"].items()}
        averaged_steps = int(state.get("averaged_steps", 0))
        if averaged_steps:
            averages = [a.to(p) for a, p in zip(state["averages"], params)]

    writer = None
    if tensorboard is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "fit(tensorboard=...) needs the tensorboard package: pip install tensorboard"
            ) from err
        writer = SummaryWriter(str(tensorboard))

    def save_checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "names": names,
                "params": _param_state(),
                "adam": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "perm_rng": perm_gen.get_state(),
                "order": order,
                "cursor": cursor,
                "history": history,
                "averages": averages,
                "averaged_steps": averaged_steps,
            },
            ckpt_path,
        )

    checking = is_validation_enabled()
    quiet = checking and not check_every_step
    if quiet and minibatching and batch < n:
        _check_whole(model, guide, data)  # the first step saw one minibatch only

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc="fit", dynamic_ncols=True)
    loss_value = math.nan
    stack = contextlib.ExitStack()
    settled = _SettledObjects()
    try:
        if quiet:  # checked above (see check_every_step); restored when the fit ends
            stack.enter_context(pyro.validation_enabled(False))
        for step in range(start, num_steps):
            if step == start + 1:  # the first step compiled what it needed
                settled.settle()
            if cursor + batch > n:
                order = torch.randperm(n, generator=perm_gen)
                cursor = 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            minibatch = data[idx] if minibatching else data
            for p in params:
                p.grad = None
            if training_phase is not None:
                training_phase(step, num_steps)
            loss = objective.differentiable_loss(model, guide, minibatch)
            if not torch.isfinite(loss):
                with pyro.validation_enabled(checking):
                    why = _explain_nonfinite_elbo(model, guide, minibatch)
                raise NonFiniteLossError(f"fit(): the loss is {float(loss)} at step {step}; " + why)
            loss.backward()
            bad = [
                nm
                for nm, p in zip(names, params)
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            if bad:
                raise NonFiniteLossError(
                    f"fit(): non-finite gradients at step {step} for parameters {bad}. If the "
                    "model computes its likelihood from an ODE trajectory by hand, use "
                    "pyro_hds.observe(), which keeps failed solutions out of the gradients."
                )
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step(lr_at(step))
            if step >= first_averaged:
                averaged_steps += 1
                with torch.no_grad():
                    if averaged_steps == 1:
                        averages = [p.detach().clone() for p in params]
                    else:
                        for a, p in zip(averages, params):
                            a.add_(p.detach() - a, alpha=1.0 / averaged_steps)
            loss_value = float(loss.detach())
            history["step"].append(step)
            history["loss"].append(loss_value)
            if writer is not None:
                writer.add_scalar("loss", loss_value, step)
                writer.add_scalar("lr", lr_at(step), step)
            due = (step + 1) % validate_every == 0 or step + 1 == num_steps
            if validation is not None and due:
                bound = _validation_bound(model, guide, validation, validation_particles)
                history["val_step"].append(step + 1)
                history["val_bound"].append(bound)
                if writer is not None:
                    writer.add_scalar("validation_bound_per_individual", bound, step)
            if callback is not None:
                callback(step, loss_value)
            if bar is not None:
                post = {"loss": f"{loss_value:.4g}"}
                if history["val_bound"]:
                    post["val"] = f"{history['val_bound'][-1]:.4g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if (step + 1) % checkpoint_every == 0:
                save_checkpoint(step + 1)
    finally:
        stack.close()
        settled.release()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    save_checkpoint(max(num_steps, start))
    if averaged_steps:  # after the checkpoint, which keeps the last iterate and the averages
        with torch.no_grad():
            for a, p in zip(averages, params):
                p.copy_(a)
    return FitResult(model=model, guide=guide, data=data, objective=objective, history=history)


def _is_dataset(data: Any) -> bool:
    from pyro_hds.data import Dataset

    return isinstance(data, Dataset)


def _validation_bound(model, guide, data, num_particles: int) -> float:
    """Mean over individuals of the importance-weighted bound (globals from one guide draw)."""
    objective = IWAE(num_particles=num_particles)
    with torch.no_grad():
        weights = objective.log_weights(model, guide, data)
    return float(weights.inner.mean())


def _check_whole(model, guide, data) -> None:
    """Pyro's and torch's checks on every individual of ``data``: one guide draw, the model
    replayed on it and every site's log-density (observations outside their site's support
    raise here, naming the site). Without gradients; torch's generator is restored, so the
    fit's draws do not depend on whether it ran."""
    state = torch.get_rng_state()
    try:
        with torch.no_grad():
            _replayed_traces(model, guide, data)[1].compute_log_prob()
    finally:
        torch.set_rng_state(state)


def _replayed_traces(model, guide, data):
    """One guide trace on ``data`` and the model's trace replayed on it."""
    import pyro.poutine as poutine

    guide_trace = poutine.trace(guide).get_trace(data)
    return guide_trace, poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(data)


def _explain_nonfinite_elbo(model, guide, data) -> str:
    """Name the sites of one trace whose log-density is not finite (for non-IWAE objectives)."""
    guide_trace, model_trace = _replayed_traces(model, guide, data)
    bad = []
    for kind, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            lp = site["fn"].log_prob(site["value"])
            if not torch.isfinite(lp).all():
                bad.append(f"{kind} site {name!r}")
    if not bad:
        return "no site's log-density was non-finite on a fresh trace (an unlucky draw?)."
    return "non-finite log-densities at " + ", ".join(bad) + "."
