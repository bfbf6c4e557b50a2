"""One module per stage, each a plain `run(options, workdir, ...)` that launchers, the pipeline and
tests call in-process. Options dataclasses (`InputOptions`, `EvalOptions`, `SketchOptions`,
`TaskSpaceOptions`, `PipelineOptions`) are the single source of every default; `schema` turns them
into configs and flags and back."""

from lmgrad.jobs.evaluate import EvalOptions
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.pipeline import PipelineOptions
from lmgrad.jobs.pretrain import PretrainOptions
from lmgrad.jobs.probe import ProbeJobOptions, ProbeOptions
from lmgrad.jobs.sketch import SketchOptions
from lmgrad.jobs.task_space import TaskSpaceOptions

__all__ = ["EvalOptions", "InputOptions", "PipelineOptions", "PretrainOptions", "ProbeJobOptions", "ProbeOptions", "SketchOptions", "TaskSpaceOptions"]
