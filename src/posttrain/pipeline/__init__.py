"""`posttrain pipeline run.yaml`: stages (sft → reward → ppo|grpo|dpo → eval) from one YAML, one
output tree, finished stages cached by content hash, interrupted stages resumed. See docs/pipeline.md."""

from posttrain.pipeline.runner import PipelineResult, StagePlan, format_plan, plan_pipeline, run_pipeline
from posttrain.pipeline.spec import Pipeline, Stage, load_pipeline

__all__ = ["Pipeline", "PipelineResult", "Stage", "StagePlan", "format_plan", "load_pipeline", "plan_pipeline",
           "run_pipeline"]
