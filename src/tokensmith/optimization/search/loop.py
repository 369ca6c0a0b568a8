"""The search loop (METHODS.md section 3A): propose → filter → evaluate → select, under one budget.

``search(adapter, problem, method="gcg", steps=..., seed=...)`` runs every method of this package. Each
step:

1. the proposer returns candidate slot ids (GCG reads the one-hot gradient of the current ids);
2. duplicates and the current ids are dropped; candidates whose string does not re-tokenize to the same
   ids in context are dropped (the fraction is recorded), and the proposer is asked again when too few
   remain;
3. the objective scores every candidate exactly (batched, prefix KV cache, target-only logits);
4. the proposer may add a second round (I-GCG's merge); the lowest loss becomes the current ids (or the
   best of a buffer of the ``buffer_size`` best candidates seen).

Stopping: ``steps``, ``time_limit`` (seconds), ``max_forwards`` (sequences run forward), ``early_stop``
(the selected candidate produces the target greedily), a ``success_fn`` predicate on generated text every
``success_every`` steps, or a callback returning True. Ctrl-C returns the best result so far (and saves it
when ``save_path`` is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.models import Encoded
from tokensmith.optimization.search.constraints import Constraints
from tokensmith.optimization.search.objectives import Evaluation, Objective, TargetLoss, multi_prompt
from tokensmith.optimization.search.proposers import Proposer, dedupe, get_proposer
from tokensmith.optimization.search.result import SearchResult, generator_state, set_generator_state, versions

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Problem", "SearchState", "search"]


@dataclass
class Problem:
    """What to optimise: an encoding with an optimizable slot, an objective, constraints.

    Args:
        encoding: one :class:`~tokensmith.models.Encoded` example from ``adapter.encode`` with a
            :class:`~tokensmith.models.Slot`, or a list of them (one universal slot over many prompts).
            Ignored when ``objective`` is given.
        objective: any :class:`~tokensmith.optimization.search.Objective` (default: the target loss of the
            encoding(s)).
        constraints: allowed tokens and the re-tokenization filter.
        slot: the slot's name when the example has several.
        init: the slot's starting ids (default: the slot's own tokens).
        loss_kwargs: options of the default :class:`TargetLoss` (``loss="mellowmax"``, ...).
    """

    encoding: Encoded | Sequence[Encoded] | None = None
    objective: Objective | None = None
    constraints: Constraints = field(default_factory=Constraints)
    slot: str | None = None
    init: torch.Tensor | None = None
    loss_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, adapter: ModelAdapter) -> Objective:
        if self.objective is not None:
            return self.objective
        if self.encoding is None:
            raise ValueError("a Problem needs an encoding (adapter.encode(..., Slot(...), target=...)) or an objective")
        if isinstance(self.encoding, Encoded):
            self.objective = TargetLoss(adapter, self.encoding, self.slot, **self.loss_kwargs)
        else:
            self.objective = multi_prompt(adapter, list(self.encoding), self.slot, **self.loss_kwargs)
        return self.objective


@dataclass
class SearchState:
    """What a proposer sees. ``grad()`` computes ∂L/∂onehot at the current ids once per step."""

    objective: Objective
    allowed: torch.Tensor
    current: torch.Tensor
    current_loss: float
    best: torch.Tensor
    best_loss: float
    step: int
    steps: int
    generator: torch.Generator
    buffer: list[tuple[float, list[int]]] = field(default_factory=list)
    _grad: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.current.shape[0])

    @property
    def adapter(self) -> ModelAdapter:
        return self.objective.adapter

    def grad(self) -> torch.Tensor:
        if self._grad is None:
            g = self.objective.grad(self.current)
            if not torch.isfinite(g).all():
                raise ValueError("the objective's gradient is NaN or inf at the current ids (check the model and loss)")
            self._grad = g
        return self._grad


def search(
    adapter: ModelAdapter,
    problem: Problem | Encoded | Objective | Sequence[Encoded],
    method: str | Proposer = "gcg",
    *,
    steps: int = 100,
    seed: int = 0,
    callbacks: Sequence[Callable[[SearchState, dict[str, Any]], bool | None]] = (),
    time_limit: float | None = None,
    max_forwards: int | None = None,
    early_stop: bool = False,
    success_fn: Callable[[str], bool] | None = None,
    success_every: int = 10,
    success_tokens: int = 32,
    buffer_size: int = 0,
    max_resample: int = 4,
    constraints: Constraints | None = None,
    resume: SearchResult | str | Path | None = None,
    save_path: str | Path | None = None,
    progress: bool = True,
    **method_kwargs: Any,
) -> SearchResult:
    """Optimise the slot of ``problem`` with a token-space search (METHODS.md section 3A).

    Red-teaming tool: use it to evaluate the robustness of models you are responsible for.

    Args:
        adapter: the model (the objective's model for a prebuilt objective).
        problem: a :class:`Problem`, an encoded example with a slot (target loss), a list of them (one
            universal slot), or an :class:`~tokensmith.optimization.search.Objective`.
        method: a registered proposer name (``"gcg"``, ``"random"``, ``"igcg"``, ``"hotflip"``, ``"pez"``, ...)
            or a :class:`Proposer` instance; ``method_kwargs`` are its options (``search_width=``, ``topk=``).
        steps: maximum number of steps.
        seed: seeds the one ``torch.Generator`` every random draw comes from (no global RNG is touched).
        callbacks: ``fn(state, record) -> bool | None`` after each step; True stops the run.
        time_limit: wall-clock budget in seconds.
        max_forwards: budget in sequences run forward (candidates + gradient passes).
        early_stop: stop once the selected candidate makes the model produce the target greedily.
        success_fn: predicate on the model's greedy generation for the best string (e.g. "does not start with a
            refusal"), checked every ``success_every`` steps; successes go to the archive.
        success_every: steps between ``success_fn`` checks.
        success_tokens: tokens generated for ``success_fn``.
        buffer_size: keep the best ``buffer_size`` candidates seen and continue from the best of them (0: move
            to the step's best candidate, as GCG does).
        max_resample: extra proposal rounds when the re-tokenization filter leaves fewer than half the
            candidates.
        constraints: overrides ``problem.constraints``.
        resume: a saved result (or its path) to continue from: current ids, buffer, history, random state.
        save_path: write the result here after every step (atomic), so an interrupted run can resume.
        progress: show a tqdm bar with the loss.
        **method_kwargs: options of the proposer.

    Returns:
        :class:`SearchResult`.

    Raises:
        ValueError: a problem without slot or target, bad options, constraints leaving too few tokens.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.models import Slot
        >>> from tokensmith.optimization import search
        >>> ad = ts.tiny("llama")
        >>> enc = ad.encode(["Say", Slot("suffix", " x x x")], target=" ok")
        >>> res = search(ad, enc, "gcg", steps=2, search_width=8, topk=4, progress=False)
        >>> res.best_loss <= res.init_loss, len(res.history), res.string_ids == res.best_ids
        (True, 2, True)
    """
    if not isinstance(problem, Problem):
        if isinstance(problem, Objective):
            problem = Problem(objective=problem)
        else:
            problem = Problem(encoding=problem)
    objective = problem.build(adapter)
    cons = constraints if constraints is not None else problem.constraints
    proposer = get_proposer(method, **method_kwargs)
    if steps < 0:
        raise ValueError("steps must be >= 0")
    allowed = cons.allowed(objective.adapter)
    if allowed.shape[0] != objective.vocab_size:
        allowed = torch.cat([allowed, torch.zeros(max(0, objective.vocab_size - len(allowed)), dtype=torch.bool)])
        allowed = allowed[: objective.vocab_size]
    gen = torch.Generator().manual_seed(int(seed))
    history: list[dict[str, Any]] = []
    archive: list[dict[str, Any]] = []
    base_forwards = base_tokens = 0
    elapsed0 = 0.0
    if resume is not None:
        prev = resume if isinstance(resume, SearchResult) else SearchResult.load(resume)
        st = prev.state
        current = torch.tensor(st["current"], dtype=torch.long)
        best = torch.tensor(prev.best_ids, dtype=torch.long)
        if current.shape[0] != objective.n:
            raise ValueError(f"the saved result has a {current.shape[0]}-token slot; this problem's slot has {objective.n}")
        history, archive = list(prev.history), list(prev.archive)
        buffer = [(float(a), list(b)) for a, b in st.get("buffer", [])]
        if st.get("generator"):
            set_generator_state(gen, st["generator"])
        base_forwards, base_tokens = history[-1]["forwards"] if history else 0, history[-1]["tokens"] if history else 0
        elapsed0 = history[-1]["seconds"] if history else 0.0
        best_loss = float(prev.best_loss)
        cur_loss = float(st.get("current_loss", best_loss))
        init_loss = prev.init_loss
        start_step = len(history)
    else:
        current = (torch.as_tensor(problem.init, dtype=torch.long) if problem.init is not None else objective.init_ids)
        current = current.reshape(-1).cpu()
        if current.shape[0] != objective.n:
            raise ValueError(f"init has {current.shape[0]} tokens; the slot has {objective.n}")
        ev0 = objective.evaluate(current[None])
        cur_loss = best_loss = init_loss = float(ev0.loss[0])
        best = current.clone()
        buffer = [(cur_loss, current.tolist())] if buffer_size > 0 else []
        start_step = 0
    state = SearchState(objective, allowed, current, cur_loss, best, best_loss, start_step, steps, gen, buffer)
    proposer.setup(state)
    if resume is not None:
        proposer.load_state_dict(prev.state.get("proposer", {}))  # after setup(), which may initialise state
        objective.load_state_dict(prev.state.get("objective", {}))

    def counters() -> tuple[int, int]:
        c = objective.counters()
        return base_forwards + c["forwards"] + c["backwards"] * 2, base_tokens + c["tokens"]

    config = {
        "method": proposer.name, "proposer": proposer.config(), "steps": steps, "seed": seed,
        "time_limit": time_limit, "max_forwards": max_forwards, "early_stop": early_stop,
        "buffer_size": buffer_size, "constraints": cons.to_dict(), "objective": repr(objective),
        "success_every": success_every if success_fn else None,
    }
    archived: set[tuple[int, ...]] = {tuple(a["ids"]) for a in archive}
    stopped = "steps"
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=f"{proposer.name}", leave=False)

    def archive_add(ids: torch.Tensor, loss: float, by: str, step: int) -> None:
        key = tuple(int(i) for i in ids.tolist())
        if key in archived:
            return
        archived.add(key)
        archive.append({"step": step, "ids": list(key), "string": objective.decode(ids), "loss": float(loss), "by": by})

    def finish(reason: str) -> SearchResult:
        text = objective.decode(state.best)
        try:
            string_loss = float(objective.rescore(text))
            renc = objective.templates[0].render(text)
            string_ids = renc.input_ids[renc.spans[objective.templates[0].slot].slice].tolist()
        except NotImplementedError:
            string_loss, string_ids = None, None
        ev = objective.evaluate(state.best[None])
        succ = None if ev.success is None else bool(ev.success[0])
        return SearchResult(
            best_ids=state.best.tolist(), best_string=text, best_loss=float(state.best_loss), init_loss=init_loss,
            string_loss=string_loss, string_ids=string_ids, success=succ, history=history, archive=archive,
            method=proposer.name, config=config, seed=seed, versions=versions(), stopped=reason,
            state={"current": state.current.tolist(), "current_loss": state.current_loss,
                   "buffer": [[a, b] for a, b in state.buffer], "generator": generator_state(gen),
                   "proposer": proposer.state_dict(), "objective": objective.state_dict()},
        )

    def snapshot() -> SearchResult:
        text = objective.decode(state.best)
        return SearchResult(
            best_ids=state.best.tolist(), best_string=text, best_loss=float(state.best_loss), init_loss=init_loss,
            history=history,
            archive=archive, method=proposer.name, config=config, seed=seed, versions=versions(), stopped="running",
            state={"current": state.current.tolist(), "current_loss": state.current_loss,
                   "buffer": [[a, b] for a, b in state.buffer], "generator": generator_state(gen),
                   "proposer": proposer.state_dict(), "objective": objective.state_dict()},
        )

    try:
        for step in range(start_step, steps):
            state.step = step
            state._grad = None
            ts = time.perf_counter()
            if time_limit is not None and elapsed0 + (ts - t0) >= time_limit:
                stopped = "time"
                break
            if max_forwards is not None and counters()[0] >= max_forwards:
                stopped = "forwards"
                break
            cands, n_prop, n_kept = _propose_filtered(proposer, state, cons.retokenize, max_resample)
            if len(cands) == 0:
                # nothing new to score (every proposal equalled the current ids or failed the filter): the step
                # keeps the current ids, and its loss is theirs
                rec = _record(step, state, float(state.current_loss), n_prop, n_kept,
                              elapsed0 + time.perf_counter() - t0, counters(), None)
                history.append(rec)
                if bar is not None:
                    bar.update(1)
                if save_path is not None:
                    snapshot().save(save_path)
                continue
            ev = objective.evaluate(cands, base=state.current)
            extra = proposer.refine(state, cands, ev)
            if extra is not None and len(extra):
                extra = dedupe(extra, state.current)
                if cons.retokenize and len(extra):
                    extra = extra[objective.round_trips(extra)]
                if len(extra):
                    ev2 = objective.evaluate(extra, base=state.current)
                    cands = torch.cat([cands, extra], 0)
                    succ = None if ev.success is None or ev2.success is None else torch.cat([ev.success, ev2.success])
                    ev = Evaluation(torch.cat([ev.loss, ev2.loss]), succ)
            if not torch.isfinite(ev.loss).any():
                raise ValueError("every candidate's loss is NaN or inf (check the model, the target and the objective)")
            i = proposer.select(state, cands, ev)
            sel_loss = float(ev.loss[i])
            if ev.success is not None:
                for j in torch.nonzero(ev.success).flatten().tolist():
                    archive_add(cands[j], float(ev.loss[j]), "greedy_target", step)
            if buffer_size > 0:
                for j in torch.argsort(ev.loss)[:buffer_size].tolist():
                    state.buffer.append((float(ev.loss[j]), cands[j].tolist()))
                seen: dict[tuple[int, ...], float] = {}
                for lo, ids in state.buffer:
                    seen[tuple(ids)] = min(lo, seen.get(tuple(ids), float("inf")))
                state.buffer = sorted(((lo, list(k)) for k, lo in seen.items()), key=lambda x: x[0])[:buffer_size]
                state.current = torch.tensor(state.buffer[0][1], dtype=torch.long)
                state.current_loss = state.buffer[0][0]
            else:
                state.current = cands[i].clone()
                state.current_loss = sel_loss
            if sel_loss < state.best_loss:
                state.best, state.best_loss = cands[i].clone(), sel_loss
            proposer.observe(state, cands, ev)
            sel_success = None if ev.success is None else bool(ev.success[i])
            rec = _record(step, state, sel_loss, n_prop, n_kept, elapsed0 + time.perf_counter() - t0, counters(), sel_success)
            if success_fn is not None and (step + 1) % max(1, success_every) == 0:
                text = _generate_for(objective, state.best, success_tokens)
                ok = bool(success_fn(text))
                rec["success_fn"] = ok
                if ok:
                    archive_add(state.best, state.best_loss, "success_fn", step)
            history.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{sel_loss:.3f}", best=f"{state.best_loss:.3f}")
                bar.update(1)
            if save_path is not None:
                snapshot().save(save_path)
            stop = False
            for cb in callbacks:
                if cb(state, rec):
                    stop = True
            if stop:
                stopped = "callback"
                break
            if early_stop and sel_success:
                stopped = "early_stop"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    res = finish(stopped)
    if save_path is not None:
        res.save(save_path)
    return res


def _record(step: int, state: SearchState, loss: float, n_prop: int, n_kept: int, seconds: float,
            counts: tuple[int, int], success: bool | None) -> dict[str, Any]:
    return {
        "step": step, "loss": loss, "best_loss": float(state.best_loss), "n_candidates": n_kept,
        "filtered": 0.0 if n_prop == 0 else 1.0 - n_kept / n_prop, "seconds": round(seconds, 4),
        "forwards": counts[0], "tokens": counts[1], "success": success,
    }


def _propose_filtered(proposer: Proposer, state: SearchState, retokenize: bool, max_resample: int) -> tuple[torch.Tensor, int, int]:
    """Propose, dedupe, filter by in-context re-tokenization; propose again while fewer than half survive."""
    kept: list[torch.Tensor] = []
    n_prop = n_kept = 0
    want = None
    for _ in range(1 + max(0, max_resample)):
        c = proposer.propose(state).to(torch.long).cpu()
        if c.dim() != 2 or c.shape[1] != state.n:
            raise ValueError(f"{type(proposer).__name__}.propose returned {tuple(c.shape)}; expected [B, {state.n}]")
        if want is None:
            want = len(c)
        c = dedupe(c, state.current)
        if kept:
            prev = {tuple(r) for k in kept for r in k.tolist()}
            c = c[[i for i, r in enumerate(c.tolist()) if tuple(r) not in prev]] if len(c) else c
        n_prop += len(c)
        if retokenize and len(c):
            c = c[state.objective.round_trips(c)]
        n_kept += len(c)
        kept.append(c)
        if n_kept * 2 >= want or not proposer.resample:
            break
    out = torch.cat(kept, 0) if kept else torch.zeros(0, state.n, dtype=torch.long)
    return out, n_prop, n_kept


def _generate_for(objective: Objective, slot_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy generation after the prompt with ``slot_ids`` in the slot (the target removed)."""
    t = objective.templates[0]
    text = objective.decode(slot_ids)
    enc = t.render(text, target=None, score_eot=False)
    res = objective.adapter.generate(enc, max_new_tokens=max_new_tokens)
    return res.texts[0]
