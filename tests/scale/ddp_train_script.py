r"""Train a tiny model for a few optimizer steps with one of tokensmith's trainers; run alone or under DDP.

Used by ``tests/scale/test_ddp_training.py`` (not collected by pytest: no ``test_`` prefix). Run it as one plain
process or with ``accelerate launch``; the same global batch gives the same run:

    python tests/scale/ddp_train_script.py --trainer weighted preference --per-device-batch 4 --out one.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port 0 tests/scale/ddp_train_script.py --trainer weighted preference \
        --per-device-batch 2 --workdir /tmp/ddp_run --out ddp.json

What makes the two runs the same computation:

- **Weights**: ``tokensmith.tiny("llama", seed=0)`` in every process (the reference of the preference run:
  ``seed=1``); HF Trainer also seeds every process with ``args.seed``.
- **Global batches**: the default random sampler. Accelerate replaces it by a ``SeedableRandomSampler`` (one
  permutation per epoch from ``args.seed``, the same in every process) and, under DDP, gives process ``r`` the
  per-device batches ``r, r + n, r + 2n, ...`` of that permutation. With one process and per-device batch
  ``n·b``, step ``k`` sees rows ``perm[k·n·b : (k+1)·n·b]``; with ``n`` processes and per-device batch ``b``,
  their union. The script records the row ids each process saw at each step (``batches``) so the test checks
  this instead of assuming it.
- **The loss**: HF logs ``loss`` as the mean over processes of each process's micro-batch loss, and DDP averages
  the gradients over processes. Both equal the global-batch quantity when every process's loss is a mean over
  the same number of equally weighted items:

  * ``weighted``: :class:`~tokensmith.optimization.training.TokenWeightedTrainer` with TLDR weights, whose loss
    is Σ m·w·CE / Σ m over the micro-batch's counted tokens. All rows have the same length and no padding, so
    every micro-batch counts ``b·(T−1)`` tokens and the mean of the per-process means is the mean over the
    global batch. (With rows of different lengths it would not be: each process divides by its own token
    count. Rho-1's top-k% is likewise taken per micro-batch, so it is not used here.)
  * ``preference``: :class:`~tokensmith.alignment.TokenPreferenceTrainer` with DPO, a mean over pairs; the
    per-process means of ``b`` pairs average to the mean over the ``n·b`` pairs. Padding differs (each
    process pads its own micro-batch) and changes the log-probs only by fp32 rounding.

- **Optimizer**: plain SGD (no momentum, no weight decay, constant lr, no gradient clipping), so a parameter's
  change is exactly ``−lr·Σ_k g_k`` and a rounding difference in a gradient moves it by ``lr`` times that
  difference (Adam would divide tiny gradients by their own tiny RMS and amplify rounding noise to ``lr``).

Output (JSON at ``--out``, written by the main process only), per trainer: ``losses`` (the logged per-step
training loss) and the full ``logs``, ``batches`` (per step, the sorted row ids of the global batch gathered from
all processes) and ``rank_batches``, ``world_size`` / ``backend`` / ``model_class`` (what actually ran),
``rank_param_sums`` (float64 sum of all parameters on every process: DDP must keep the replicas equal),
``param_sum``, ``max_abs_param``, ``max_update_per_step`` (max |θ_k − θ_{k−1}|), ``logit_scale`` (max |logit| of
the policy over all rows, before and after), ``tokens_per_step`` (positions in a global batch), ``scored_per_item`` (the most scored tokens of one row / pair)
and timings.
``--params-dir`` receives the final parameters as ``<trainer>.safetensors``.

Launcher note: ``accelerate launch --cpu --num_processes 2`` (accelerate 1.16) starts ONE process unless an MPI
hostfile is given (``--mpirun_hostfile``): its "simple launcher" runs the script once. ``--multi_gpu
--num_processes 2`` goes through torchrun and, on a host without GPUs (or with ``use_cpu=True``), gives DDP over
gloo on the CPU; ``world_size`` in the output says which one ran.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

if __name__ == "__main__":  # a run, not pytest's --doctest-modules import: offline, one thread per process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import tokensmith as ts  # noqa: E402

N_ROWS = 16  # 4 steps of global batch 4 = one epoch
SEQ_LEN = 12
BETA = 0.1
LR = {"weighted": 0.05, "preference": 0.05}  # the loss falls steadily over 4 steps (0.5 overshoots)


def weighted_rows(tokenizer) -> datasets.Dataset:
    """``N_ROWS`` rows of exactly ``SEQ_LEN`` token ids (no padding anywhere): consecutive windows of the token
    stream of the demo preference prompts and answers (``demo_pairs(64, seed=0)``), repetitive enough that a few
    SGD steps lower the loss."""
    from tokensmith.alignment.pairs import demo_pairs

    text = " ".join(r["prompt"] + r["chosen"] for r in demo_pairs(64, seed=0))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < N_ROWS * SEQ_LEN:
        raise RuntimeError(f"the demo text has only {len(ids)} tokens")
    return datasets.Dataset.from_dict({"input_ids": [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(N_ROWS)]})


class RecordingCollator:
    """Calls ``collate`` and remembers the row id of every row it batched, in order (one list per batch)."""

    def __init__(self, collate, row_id):
        self.collate, self.row_id, self.seen = collate, row_id, []

    def __call__(self, rows):
        rows = list(rows)
        self.seen.append([self.row_id(r) for r in rows])
        return self.collate(rows)


class UpdateRecorder(transformers.TrainerCallback):
    """After every optimizer step: max |θ_k − θ_{k−1}| over all parameters (the SGD update's size)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.max_update = model, []
        self.prev = {n: q.detach().clone() for n, q in model.named_parameters()}

    def on_step_end(self, args, state, control, **kwargs):
        m = 0.0
        for n, q in self.model.named_parameters():
            m = max(m, float((q.detach() - self.prev[n]).abs().max()))
            self.prev[n].copy_(q.detach())
        self.max_update.append(m)


def build_trainer(kind: str, args: transformers.TrainingArguments, pref_loss: str = "dpo"):
    """The trainer, the policy adapter, a function giving the policy's max |logit| over all training rows, the
    positions of one item (row / pair) and the most tokens one item's loss scores."""
    policy = ts.tiny("llama", seed=0)
    if kind == "weighted":
        from tokensmith.optimization.training import TokenWeightedTrainer

        ds = weighted_rows(policy.tokenizer)
        index = {tuple(r): i for i, r in enumerate(ds["input_ids"])}
        collate = RecordingCollator(  # no labels, no attention mask: every token after the first is counted
            transformers.default_data_collator, lambda r: index[tuple(int(t) for t in r["input_ids"])]
        )
        tr = TokenWeightedTrainer(policy, args, weighter="tldr", n_buckets=0, train_dataset=ds, data_collator=collate)
        all_rows = torch.tensor(ds["input_ids"])
        tokens_per_item, scored_per_item = SEQ_LEN, SEQ_LEN - 1
    elif kind == "preference":
        from tokensmith.alignment import TokenPreferenceTrainer
        from tokensmith.alignment.data import encode_pairs
        from tokensmith.alignment.pairs import demo_pairs

        ds = demo_pairs(N_ROWS, seed=0)
        index = {r["prompt"] + "\x00" + r["chosen"] + "\x00" + r["rejected"]: i for i, r in enumerate(ds)}
        reference = ts.tiny("llama", seed=1)
        tr = TokenPreferenceTrainer(policy, reference, loss=pref_loss, beta=BETA, args=args, train_dataset=ds, chat=False)
        tr.data_collator = RecordingCollator(
            tr.data_collator, lambda r: index[r["prompt"] + "\x00" + r["chosen"] + "\x00" + r["rejected"]]
        )
        pb = encode_pairs(policy, list(ds), chat=False)
        all_rows = pb.batch
        tokens_per_item = 2 * int(all_rows.input_ids.shape[1])  # chosen + rejected row, at most this long
        scored_per_item = int((pb.mask_w.sum(1) + pb.mask_l.sum(1)).max())  # completion tokens of a pair
    else:
        raise ValueError(f"unknown trainer {kind!r}: use 'weighted' or 'preference'")
    tr.remove_callback(transformers.trainer_callback.PrinterCallback)  # disable_tqdm prints every log otherwise

    def logit_scale() -> float:
        with torch.no_grad(), policy.eval_mode():
            return float(policy.forward(all_rows).logits.abs().max())

    return tr, policy, logit_scale, tokens_per_item, scored_per_item


def run(kind: str, a: argparse.Namespace, workdir: str) -> dict | None:
    lr = a.lr if a.lr is not None else LR[kind]
    args = transformers.TrainingArguments(
        workdir,
        per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        optim="sgd",  # torch.optim.SGD: no momentum, θ ← θ − lr·g
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,  # no clipping
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
    )
    tr, policy, logit_scale, tokens_per_item, scored_per_item = build_trainer(kind, args, a.pref_loss)
    scale0 = logit_scale()
    recorder = UpdateRecorder(policy.model)
    tr.add_callback(recorder)
    t1 = time.perf_counter()
    tr.train()
    t_train = time.perf_counter() - t1
    logs = [h for h in tr.state.log_history if "loss" in h and "train_loss" not in h]
    world = tr.accelerator.num_processes
    # the first `steps` batches this process collated (the data loader may fetch one more)
    mine = tr.data_collator.seen[: a.steps]
    params = {n: q.detach().cpu().contiguous() for n, q in policy.model.named_parameters()}
    psum = float(sum(q.double().sum() for q in params.values()))
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"batches": mine, "param_sum": psum})
        backend = dist.get_backend()
    else:
        gathered, backend = [{"batches": mine, "param_sum": psum}], None
    out = None
    if tr.accelerator.is_main_process:
        out = {
            "trainer": kind,
            "world_size": world,
            "distributed_type": str(tr.accelerator.distributed_type),
            "backend": backend,
            "model_class": type(tr.model_wrapped).__name__,
            "per_device_batch": a.per_device_batch,
            "global_batch": a.per_device_batch * world,
            "steps": tr.state.global_step,
            "lr": lr,
            "losses": [h["loss"] for h in logs],
            "logs": logs,
            "batches": [sorted(i for g in gathered for i in g["batches"][k]) for k in range(a.steps)],
            "rank_batches": [g["batches"] for g in gathered],
            "rank_param_sums": [g["param_sum"] for g in gathered],
            "param_sum": psum,
            "max_abs_param": max(float(q.abs().max()) for q in params.values()),
            "max_update_per_step": recorder.max_update,
            "logit_scale": max(scale0, logit_scale()),
            "tokens_per_step": a.per_device_batch * world * tokens_per_item,
            "scored_per_item": scored_per_item,
            "seq_len": SEQ_LEN,
            "hidden": int(policy.structure.hidden_size),
            "n_layers": int(policy.structure.num_layers),
            "vocab": int(policy.structure.vocab_size),
            "beta": BETA,
            "pref_loss": a.pref_loss,
            "train_seconds": t_train,
        }
        if a.params_dir:
            from safetensors.torch import save_file

            save_file(params, os.path.join(a.params_dir, f"{kind}.safetensors"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", nargs="+", choices=("weighted", "preference"), required=True,
                   help="one or both trainers (run one after the other in the same processes)")
    p.add_argument("--per-device-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pref-loss", default="dpo", help="TokenPreferenceTrainer loss (dpo; tdpo adds the live KL)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: per trainer, LR)")
    p.add_argument("--out", required=True, help="JSON results, {trainer: {...}} (main process)")
    p.add_argument("--params-dir", default=None, help="write <trainer>.safetensors, the final parameters, here")
    p.add_argument("--workdir", default=None, help="Trainer output_dir root, the same for every process "
                   "(default: a temporary directory per process)")
    a = p.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: one thread per process is fastest on a small shared CPU
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.trainer:
            results[kind] = run(kind, a, os.path.join(a.workdir or tmp, kind))
    from accelerate import PartialState

    ps = PartialState()
    if ps.is_main_process:
        for r in results.values():
            r["total_seconds"] = time.perf_counter() - t0
            r["torch_threads"] = torch.get_num_threads()
            r["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    ps.wait_for_everyone()


if __name__ == "__main__":
    main()
