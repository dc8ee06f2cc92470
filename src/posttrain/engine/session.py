"""Everything around a recipe's loss: optimizer and schedule, accelerate preparation, resume,
gradient sync, clipping, the NaN guard, metrics, checkpoints and signals.

A recipe keeps its loop visible and calls the session at the edges:

    with TrainingSession(accelerator, config, module, total_steps=..., steps_per_epoch=...) as run:
        for step in run.steps():
            normaliser = run.global_sum(local_count)       # e.g. target tokens in the whole step
            for k, batch in enumerate(micro_batches):
                with run.sync(k, len(micro_batches)):
                    loss = ... / normaliser * run.world_size
                    run.backward(loss)
            if run.finish_step(step, loss=step_loss, tokens=n, metrics={...}):
                break
        run.save_model(tokenizer)
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from posttrain.config import TrainingConfig, config_to_dict
from posttrain.engine.checkpoint import (
    load_checkpoint,
    load_checkpoint_tensors,
    remove_stale_temporaries,
    resolve_resume_path,
    save_checkpoint,
)
from posttrain.engine.metrics_log import MetricsLog, StepTimer
from posttrain.engine.optim import build_optimizer, build_scheduler, warmup_steps_for
from posttrain.engine.peak_memory import peak_memory_bytes
from posttrain.engine.stop_signals import GracefulStop
from posttrain.errors import NonFiniteLossError


class TrainingSession:
    def __init__(self, accelerator, config: TrainingConfig, module: torch.nn.Module, *, total_steps: int,
                 steps_per_epoch: int) -> None:
        self.accelerator = accelerator
        self.config = config
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.output_dir = Path(config.output_dir)
        self.world_size = accelerator.num_processes
        optimizer = build_optimizer(module, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                    betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        scheduler = build_scheduler(optimizer, name=config.lr_scheduler_type, total_steps=total_steps,
                                    warmup_steps=warmup_steps_for(total_steps, config.warmup_steps,
                                                                  config.warmup_ratio))
        self.module, self.optimizer, self.scheduler = accelerator.prepare(module, optimizer, scheduler)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

        self.start_step, self.num_tokens, elapsed = 0, 0, 0.0
        # Recipe state that must survive a resume (e.g. BCO's running reward mean); JSON-able values.
        self.extra_state: dict = {}
        # Recipe tensors that must survive a resume, per process (e.g. GRPO's rollout between its
        # --num_iterations passes); saved only when non-empty.
        self.extra_tensors: dict = {}
        # what a checkpoint writes as loadable model files (set_model_for_checkpoints); None: state only
        self._checkpoint_models: tuple | None = None
        if accelerator.is_main_process:
            remove_stale_temporaries(self.output_dir)
        self.resumed_from = resolve_resume_path(config.resume_from_checkpoint, self.output_dir)
        if self.resumed_from is not None:
            state = load_checkpoint(accelerator, self.resumed_from)
            self.start_step, self.num_tokens, elapsed = state["step"], state["num_tokens"], state["elapsed_seconds"]
            self.extra_state = state.get("extra", {})
            self.extra_tensors = load_checkpoint_tensors(accelerator, self.resumed_from)
            accelerator.print(f"resumed from {self.resumed_from} at step {self.start_step}")
        self.last_checkpoint: Path | None = self.resumed_from
        self.timer = StepTimer(elapsed)
        self.metrics = MetricsLog(accelerator, self.output_dir, total_steps=total_steps, start_step=self.start_step,
                                  disable_progress=config.disable_tqdm, tracker_config=config_to_dict(config),
                                  run_name=config.run_name)
        self._window: dict[str, float] = {}
        self._window_steps = 0
        self._window_tokens = 0
        self._window_seconds = 0.0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.stopped_early = False
        self.report_path: Path | None = None  # report.html, written by save_model
        self.steps_done = self.start_step
        self.fp16_skipped_steps = 0  # overflowing fp16 steps the gradient scaler skipped
        self._stop = GracefulStop()

    # -- context: signals are caught only while the loop runs ---------------------------------
    def __enter__(self) -> TrainingSession:
        self._stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.__exit__(*exc)
        self.metrics.close()

    def steps(self):
        """Optimizer step indices still to run (after a resume, from where it stopped)."""
        for step in range(self.start_step, self.total_steps):
            self.timer.start()
            yield step

    # -- inside a step --------------------------------------------------------------------------
    def global_sum(self, value: float | int | torch.Tensor) -> float:
        """Sum of a number over every process (e.g. the step's loss normaliser)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, "sum").item()

    def sync(self, k: int, n: int):
        """Gradients are all-reduced once per step, on its last micro-batch."""
        return self.accelerator.no_sync(self.module) if k < n - 1 else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def finish_step(self, step: int, *, loss: torch.Tensor, tokens: int, metrics: dict[str, float]) -> bool:
        """Clip, refuse a non-finite loss or gradient (before the update), step optimizer and
        schedule, log, checkpoint. `loss` is this process's share of the step loss (summed over
        processes here); `metrics` are already global. Returns True when the run must stop."""
        cfg = self.config
        loss = self.accelerator.reduce(loss.detach().double(), "sum")  # fp64: a float64 run keeps its bits
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(self.params, clip))  # fp16: unscales first
        scaler = self.accelerator.scaler  # fp16 only: an overflowing gradient is the scaler's to skip
        if not torch.isfinite(loss) or (scaler is None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else ""
            hint = " (an fp16 forward overflowed: try --bf16)" if scaler is not None else ""
            raise NonFiniteLossError(f"step {step + 1}: loss {loss.item()} / grad norm {grad_norm} is not finite; "
                                     f"the update was not applied and the run stopped{where}{hint}")
        lr = self.scheduler.get_last_lr()[0]  # the rate this step trains with
        if not self.optimizer_step():  # fp16 overflow (as HF Trainer): no update, no schedule step, go on
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        took = self.timer.stop()

        tokens = int(self.global_sum(tokens))
        self.num_tokens += tokens
        loss_value = loss.item()
        self.first_loss = loss_value if self.first_loss is None else self.first_loss
        self.last_loss = loss_value
        for key, value in {"loss": loss_value, "grad_norm": grad_norm, **metrics}.items():
            self._window[key] = self._window.get(key, 0.0) + float(value)
        self._window_steps += 1
        self._window_tokens += tokens
        self._window_seconds += took
        done = step + 1
        self.steps_done = done
        self.metrics.advance()
        if done % cfg.logging_steps == 0 or done == self.total_steps:
            averaged = {k: v / self._window_steps for k, v in self._window.items()}
            self.metrics.log(done, {
                "loss": averaged.pop("loss"),
                "learning_rate": lr,
                "grad_norm": averaged.pop("grad_norm"),
                **averaged,
                **self._fp16_metrics(),
                "num_tokens": self.num_tokens,
                "tokens_per_second": self._window_tokens / max(self._window_seconds, 1e-9),
                "epoch": done / self.steps_per_epoch,
                "elapsed_seconds": self.timer.elapsed,
            })
            self._window, self._window_steps, self._window_tokens, self._window_seconds = {}, 0, 0, 0.0
        save_now = cfg.save_steps > 0 and done % cfg.save_steps == 0 and done < self.total_steps
        if save_now or self._stop.requested:
            self.last_checkpoint = save_checkpoint(
                self.accelerator, self.output_dir, done,
                {"num_tokens": self.num_tokens, "elapsed_seconds": self.timer.elapsed, "extra": self.extra_state},
                save_total_limit=cfg.save_total_limit, tensors=self.extra_tensors,
                write_model=self._write_checkpoint_model if self._checkpoint_models else None)
        if self._stop.requested:
            self.accelerator.print(f"{self._stop.signal_name}: stopped after step {done}; checkpoint saved at "
                                   f"{self.last_checkpoint}. Resume with --resume_from_checkpoint latest")
            self.stopped_early = True
            return True
        return False

    def optimizer_step(self) -> bool:
        """Step the optimizer; True when fp16's gradient scaler skipped it for overflow (it then
        lowers its scale: that back-off is the test, since a fused AdamW always runs its step, skipping
        inside, which accelerate's optimizer_step_was_skipped does not see)."""
        scaler = self.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None else None
        self.optimizer.step()
        skipped = scaler is not None and scaler.get_scale() < scale
        self.fp16_skipped_steps += int(skipped)
        return skipped

    def _fp16_metrics(self) -> dict[str, float]:
        """fp16 only: the scaler's current scale and the steps skipped for overflow so far (this process's
        run; not carried over a resume)."""
        if self.accelerator.scaler is None:
            return {}
        return {"fp16/loss_scale": float(self.accelerator.scaler.get_scale()),
                "fp16/skipped_steps": self.fp16_skipped_steps}

    # -- checkpoints a user can load ----------------------------------------------------------------
    def set_model_for_checkpoints(self, model: torch.nn.Module, tokenizer, *,
                                  extra: dict | None = None) -> None:
        """Every checkpoint also holds `model` (the HF or peft model, as the final save writes it)
        and `tokenizer`, so checkpoints/step-N loads with from_pretrained. `extra`: subdirectory ->
        a model saved the same way, or a callable `write(dir)` (e.g. PPO's critic in value_model/)."""
        self._checkpoint_models = (model, tokenizer, dict(extra or {}))

    def _write_checkpoint_model(self, directory: Path) -> None:
        """Called on every process: a sharded model's full weights are gathered collectively
        (full_state_dict); the main process writes."""
        from posttrain.models.saving import full_state_dict, write_pretrained_files

        model, tokenizer, extra = self._checkpoint_models
        main = self.accelerator.is_main_process
        state = full_state_dict(model)
        if main:
            write_pretrained_files(model, tokenizer, directory, state_dict=state)
        for sub, item in extra.items():
            is_module = isinstance(item, torch.nn.Module)
            state = full_state_dict(item) if is_module else None
            if not main:
                continue
            (directory / sub).mkdir(parents=True, exist_ok=True)
            if is_module:
                write_pretrained_files(item, tokenizer, directory / sub, state_dict=state)
            else:
                item(directory / sub)

    # -- evaluation -------------------------------------------------------------------------------
    def maybe_evaluate(self, step: int, eval_steps: int, evaluate) -> None:
        """Log `evaluate()` after optimizer step `step` when --eval_steps says so (not at the end)."""
        done = step + 1
        if eval_steps and done % eval_steps == 0 and done < self.total_steps:
            self.metrics.log(done, evaluate())

    def final_evaluation(self, evaluate) -> dict[str, float]:
        """Evaluate once at the end (unless stopped early): logged and written to eval_results.json."""
        if self.stopped_early:
            return {}
        results = evaluate()
        self.metrics.log(self.steps_done, results)
        if self.accelerator.is_main_process:
            (self.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        return results

    # -- the end ----------------------------------------------------------------------------------
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.module)

    def save_model(self, model, tokenizer, *, merge_adapter: bool = False, extra_summary: dict | None = None) -> None:
        """Final model (HF format) + run_summary.json, unless the run was stopped early."""
        from posttrain.models.saving import full_state_dict, save_pretrained_model

        if self.stopped_early:
            return
        state = full_state_dict(model)  # FSDP2: gathered on every process (collective), None otherwise
        if self.accelerator.is_main_process:
            save_pretrained_model(model, tokenizer, self.output_dir, state_dict=state)
            if merge_adapter:
                save_pretrained_model(model, tokenizer, self.output_dir / "merged", merge_adapter=True,
                                      state_dict=state)
            summary = {"steps": self.total_steps - self.start_step, "train_seconds": self.timer.elapsed,
                       "num_tokens": self.num_tokens,
                       "tokens_per_second": self.num_tokens / max(self.timer.elapsed, 1e-9),
                       "first_loss": self.first_loss, "last_loss": self.last_loss,
                       "peak_memory_bytes": peak_memory_bytes(),
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra_summary or {})}
            (self.output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2))
            from posttrain.report.html_report import write_report_safely

            # after the model is saved: a failed report only warns, it never costs the model
            self.report_path = write_report_safely(self.output_dir, self.accelerator.print)
        self.accelerator.wait_for_everyone()
        report = f", report {self.report_path}" if self.report_path else ""
        self.accelerator.print(f"done: model in {self.output_dir}, metrics in {self.metrics.path}{report}")

